//! The batching task of one replica: owns the waiting queue, the running batch
//! and the block allocator; between decode steps it prefills newcomers and
//! merges them in. After every step and admission it publishes its [`Load`].

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tessera_proto as pb;
use tokio::sync::{mpsc, watch};
use tracing::{info_span, warn, Instrument, Span};

use super::blocks::BlockAllocator;
use super::policy::{admit, should_prefill, Admission, Need};
use super::replica::Load;
use super::{Entry, Health, HealthReporter};
use crate::client::{ClientError, ShardedClient, Step};
use crate::config::BatchingConfig;
use crate::infer::{
    FinishReason, GeneratedText, InferError, InferStreamResponse, PromptLogprobs, Token,
};
use crate::metrics::{Metrics, ReplicaMetrics};

/// A request in the running batch.
struct Active {
    entry: Entry,
    blocks: Vec<u32>,
    /// Prompt tokens served from the prefix cache.
    cached_tokens: u32,
    start: Instant,
    generated: u32,
    text: String,
}

impl Active {
    /// `entry`, starting to generate with its prompt in `blocks`.
    fn new(entry: Entry, blocks: Vec<u32>, cached_tokens: u32, start: Instant) -> Self {
        Self {
            entry,
            blocks,
            cached_tokens,
            start,
            generated: 0,
            text: String::new(),
        }
    }
}

/// A prompt being prefilled in chunks (one per step, within the prefill-token
/// budget, while the running batch keeps decoding): it holds all its KV blocks,
/// and the shard keeps nothing else of it between chunks.
struct Partial {
    id: u64,
    entry: Entry,
    blocks: Vec<u32>,
    /// Prompt tokens served from the prefix cache.
    cached_tokens: u32,
    /// Prompt positions whose keys and values are in its blocks.
    done: u32,
    start: Instant,
}

struct Running {
    /// Shard batches to decode together (merged into the first by the next step).
    batch_ids: Vec<u64>,
    requests: HashMap<u64, Active>,
}

pub struct BatchingTask {
    /// The replica's index (metric labels, spans).
    replica: usize,
    client: ShardedClient,
    config: BatchingConfig,
    blocks: BlockAllocator,
    metrics: ReplicaMetrics,
    health: HealthReporter,
    load: watch::Sender<Load>,
    /// Entries taken from the channel, and their blocks, ever.
    received: u64,
    received_blocks: u64,
    waiting: VecDeque<(u64, Entry)>,
    running: Running,
    /// At most one prompt in chunks.
    partial: Option<Partial>,
    next_request_id: u64,
    next_batch_id: u64,
    steps_since_prefill: u32,
}

fn token(t: Option<pb::Token>) -> Token {
    let t = t.unwrap_or_default();
    Token {
        id: t.id,
        text: t.text,
        logprob: t.logprob,
        special: t.special,
    }
}

/// Records each rank's own forward time of a step (ranks that sent none are skipped).
fn observe_ranks(series: &[prometheus::Histogram], timings: &[Option<pb::Timings>]) {
    for (histogram, t) in series.iter().zip(timings) {
        if let Some(t) = t {
            histogram.observe(t.forward_ns as f64 / 1e9);
        }
    }
}

fn finish_reason(code: i32) -> Option<FinishReason> {
    match pb::FinishReason::try_from(code).unwrap_or(pb::FinishReason::Unspecified) {
        pb::FinishReason::Unspecified => None,
        pb::FinishReason::Length => Some(FinishReason::Length),
        pb::FinishReason::EosToken => Some(FinishReason::EosToken),
        pb::FinishReason::StopSequence => Some(FinishReason::StopSequence),
    }
}

/// The span of one step over `requests`, made by `make` as a child of the
/// `infer` span of the step's oldest request (the lowest id), with a span link
/// to every other request's `infer` span: the step and the shard calls below
/// it belong to one request's trace and are reachable from the others'. (Each
/// rank also records a span per request in that request's own trace: see
/// `RequestTrace` in the contract.)
fn step_span<'a>(
    requests: impl Iterator<Item = (u64, &'a Entry)>,
    make: impl FnOnce(&Span) -> Span,
) -> Span {
    let mut requests: Vec<(u64, &Entry)> = requests.collect();
    requests.sort_unstable_by_key(|&(id, _)| id);
    let Some(&(_, first)) = requests.first() else {
        return Span::none();
    };
    let span = make(&first.span);
    for (_, entry) in &requests[1..] {
        span.follows_from(&entry.span);
    }
    span
}

impl BatchingTask {
    /// The task of replica `replica`, over a KV pool of `num_blocks` blocks of
    /// `block_size` tokens (its own warmup's answer).
    pub fn new(
        replica: usize,
        client: ShardedClient,
        config: BatchingConfig,
        num_blocks: u32,
        block_size: u32,
        metrics: &Metrics,
        health: HealthReporter,
    ) -> Self {
        let blocks = BlockAllocator::new(num_blocks, block_size, config.max_batch_total_tokens)
            .with_prefix_caching(config.prefix_caching);
        let metrics = metrics.replica_ranks(replica, client.world_size());
        metrics.kv_blocks_free.set(i64::from(blocks.free()));
        metrics.kv_blocks_used.set(0);
        let (load, _) = watch::channel(Load {
            free_blocks: u64::from(blocks.free()),
            ..Load::default()
        });
        Self {
            replica,
            client,
            config,
            blocks,
            metrics,
            health,
            load,
            received: 0,
            received_blocks: 0,
            waiting: VecDeque::new(),
            running: Running {
                batch_ids: Vec::new(),
                requests: HashMap::new(),
            },
            partial: None,
            next_request_id: 0,
            next_batch_id: 0,
            steps_since_prefill: 0,
        }
    }

    /// KV tokens the router may hand out in all.
    pub fn capacity_tokens(&self) -> u64 {
        self.blocks.total() as u64 * self.blocks.block_size() as u64
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> u32 {
        self.blocks.block_size()
    }

    /// The task's [`Load`], updated after every step and admission.
    pub fn load(&self) -> watch::Receiver<Load> {
        self.load.subscribe()
    }

    /// Runs until the entry channel closes and every request is done.
    pub async fn run(mut self, mut entries: mpsc::UnboundedReceiver<Entry>) {
        let mut open = true;
        loop {
            if open && self.idle() {
                match entries.recv().await {
                    Some(entry) => self.enqueue(entry),
                    None => open = false,
                }
            }
            while open {
                match entries.try_recv() {
                    Ok(entry) => self.enqueue(entry),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if !open && self.idle() {
                break;
            }
            self.waiting.retain(|(_, e)| !e.response.is_closed());
            if let Some(p) = self.partial.take_if(|p| p.entry.response.is_closed()) {
                // Its client left between two chunks: the shard holds nothing of it.
                self.blocks.release(p.blocks);
            }
            self.update_gauges();
            // A prefill also takes the running batch's decode step, in the same
            // forward pass on the shard; a prompt in chunks takes its next chunk at
            // every step.
            let mut stepped = false;
            if self.partial.is_some()
                || should_prefill(
                    &self.config,
                    self.waiting.len(),
                    self.running.requests.len(),
                    self.steps_since_prefill,
                )
            {
                stepped = self.prefill().await;
            }
            if !self.running.requests.is_empty() {
                if !stepped {
                    self.decode().await;
                }
                self.drop_cancelled().await;
            } else if !self.waiting.is_empty() && self.partial.is_none() {
                // Waiting requests that do not fit yet wait for blocks to come back;
                // with nothing running none will, unless they were cancelled.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Also when the last request just finished: the loop may now sleep.
            self.update_gauges();
        }
    }

    /// Nothing waits, runs or is being prefilled.
    fn idle(&self) -> bool {
        self.running.requests.is_empty() && self.waiting.is_empty() && self.partial.is_none()
    }

    fn enqueue(&mut self, entry: Entry) {
        let needed =
            entry.request.input_ids.len() as u64 + entry.request.stopping.max_new_tokens as u64;
        let capacity = self.capacity_tokens();
        let blocks = self.blocks.blocks_for(needed);
        // The dispatcher counted these when it sent the entry (same formula).
        self.received += 1;
        self.received_blocks += blocks;
        if blocks > self.blocks.total() as u64 {
            entry.fail(InferError::TooLarge { needed, capacity });
            return;
        }
        let id = self.next_request_id;
        self.next_request_id += 1;
        entry.span.record("request_id", id);
        self.waiting.push_back((id, entry));
    }

    /// Sets the replica's gauges and publishes its load to the dispatcher.
    fn update_gauges(&self) {
        self.metrics.queue_size.set(self.waiting.len() as i64);
        let running = self.running.requests.len() + usize::from(self.partial.is_some());
        self.metrics.batch_size.set(running as i64);
        self.metrics
            .kv_blocks_free
            .set(i64::from(self.blocks.free()));
        self.metrics
            .kv_blocks_used
            .set(i64::from(self.blocks.used()));
        self.metrics
            .kv_blocks_cached
            .set(i64::from(self.blocks.cached()));
        let load = Load {
            free_blocks: u64::from(self.blocks.free()),
            queued_blocks: self.waiting.iter().map(|(_, e)| self.need(e).blocks).sum(),
            queued: self.waiting.len() as u64,
            running: running as u64,
            received: self.received,
            received_blocks: self.received_blocks,
        };
        self.load.send_if_modified(|current| {
            let changed = *current != load;
            *current = load;
            changed
        });
    }

    fn need(&self, entry: &Entry) -> Need {
        let input = entry.request.input_ids.len() as u64;
        Need {
            input_tokens: input,
            blocks: self
                .blocks
                .blocks_for(input + entry.request.stopping.max_new_tokens as u64),
            chunkable: !entry.request.prompt_logprobs,
        }
    }

    /// What the next prefill admits of the waiting requests when `used` prompt
    /// tokens of its budget go to the prompt in chunks, if any (which will still be
    /// in chunks after this step with `chunking`: then no other prompt starts).
    /// `in_step` requests of the step are not in the running batch yet (the prompt
    /// in chunks).
    fn admission(&self, used: u64, in_step: usize, chunking: bool) -> Admission {
        let in_batch = self.running.requests.len() + in_step;
        admit(
            &self.config,
            self.waiting.iter().map(|(_, e)| self.need(e)),
            in_batch,
            self.blocks.free() as u64,
            used,
            self.config.chunked_prefill && !chunking,
        )
    }

    /// Whether the loop will prefill after a step, `steps` decode steps after the last
    /// prefill: then the shard should not step the running batch ahead, so that the
    /// step can share the prefill's forward pass. (A guess: requests that finish or
    /// arrive in between may change it, which costs time, never a token.)
    fn prefill_expected(&self, steps: u32) -> bool {
        self.config.decode_in_prefill
            && (self.partial.is_some()
                || should_prefill(
                    &self.config,
                    self.waiting.len(),
                    self.running.requests.len(),
                    steps,
                ) && self.admission(0, 0, false) != Admission::default())
    }

    /// The shard's request for `entry`'s prompt up to `end`, past its first
    /// `cached_tokens` (already in `blocks`); `prefill_only` for a chunk that is not
    /// the prompt's last.
    fn shard_request(
        id: u64,
        entry: &Entry,
        blocks: &[u32],
        cached_tokens: u32,
        end: u32,
        prefill_only: bool,
    ) -> pb::Request {
        let r = &entry.request;
        let p = &r.parameters;
        pb::Request {
            id,
            input_ids: r.input_ids[..end as usize].to_vec(),
            sampling: Some(pb::SamplingParameters {
                temperature: p.temperature,
                do_sample: p.do_sample,
                top_k: p.top_k,
                top_p: p.top_p,
                typical_p: p.typical_p,
                min_p: p.min_p,
                repetition_penalty: p.repetition_penalty,
                frequency_penalty: p.frequency_penalty,
                presence_penalty: p.presence_penalty,
                seed: p.seed,
                top_n_tokens: p.top_n_tokens,
                logit_bias: p.logit_bias.iter().copied().collect(),
                json_object: p.json_object,
            }),
            stopping: Some(pb::StoppingParameters {
                max_new_tokens: r.stopping.max_new_tokens,
                stop_sequences: r.stopping.stop_sequences.clone(),
                ignore_eos: r.stopping.ignore_eos,
                min_new_tokens: r.stopping.min_new_tokens,
            }),
            blocks: blocks.to_vec(),
            cached_tokens,
            prompt_logprobs: r.prompt_logprobs,
            prefill_only,
        }
    }

    /// Takes `entry` off the queue into this prefill: allocates its blocks (sharing
    /// a cached prefix when it may), or fails it when none are free.
    fn allocate(&mut self, entry: &Entry) -> Option<crate::batcher::blocks::Allocation> {
        let need = self.need(entry);
        // Prompt log-probabilities need every prompt position computed.
        let reuse = !entry.request.prompt_logprobs;
        let allocation =
            self.blocks
                .allocate_for_prompt(&entry.request.input_ids, need.blocks, reuse)?;
        self.metrics.prefix_cache_queries.inc_by(need.input_tokens);
        self.metrics
            .prefix_cache_hits
            .inc_by(u64::from(allocation.cached_tokens));
        Some(allocation)
    }

    /// Admits waiting requests and prefills them, with the next chunk of the prompt
    /// in chunks, if any; the running batches take their decode step in the same
    /// call. Returns whether they did.
    async fn prefill(&mut self) -> bool {
        let budget = u64::from(self.config.max_batch_prefill_tokens);
        let start = Instant::now();
        let mut requests = Vec::new();
        let mut new = HashMap::new();
        let mut traces = Vec::new();
        let trace = |traces: &mut Vec<pb::RequestTrace>, id: u64, entry: &Entry| {
            if let Some(traceparent) = &entry.traceparent {
                traces.push(pb::RequestTrace {
                    request_id: id,
                    traceparent: traceparent.clone(),
                });
            }
        };
        // The prompt in chunks goes first: its next chunk, or the rest of it.
        let mut used = 0u64;
        let mut partial = None;
        let in_step = usize::from(self.partial.is_some());
        if let Some(p) = self.partial.take() {
            let len = p.entry.request.input_ids.len() as u32;
            let rest = len - p.done;
            trace(&mut traces, p.id, &p.entry);
            if u64::from(rest) <= budget {
                used = u64::from(rest);
                requests.push(Self::shard_request(
                    p.id, &p.entry, &p.blocks, p.done, len, false,
                ));
                new.insert(
                    p.id,
                    Active::new(p.entry, p.blocks, p.cached_tokens, p.start),
                );
            } else {
                used = budget;
                let end = p.done + budget as u32;
                requests.push(Self::shard_request(
                    p.id, &p.entry, &p.blocks, p.done, end, true,
                ));
                partial = Some(Partial { done: end, ..p });
            }
        }
        let admission = self.admission(used, in_step, partial.is_some());
        // The admitted requests, the last one perhaps with the size of its first chunk
        // (taken off the queue only when the admission says so).
        let mut admitted: Vec<(u64, Entry, Option<u64>)> = self
            .waiting
            .drain(..admission.whole)
            .map(|(id, entry)| (id, entry, None))
            .collect();
        if let Some(chunk) = admission.chunk {
            if let Some((id, entry)) = self.waiting.pop_front() {
                admitted.push((id, entry, Some(chunk)));
            }
        }
        for (id, mut entry, chunk) in admitted {
            // Admitted: its wait in the queue ends here.
            entry.queue_span = Span::none();
            let Some(allocation) = self.allocate(&entry) else {
                // admit() checked the free blocks; this cannot happen, but never lose a request.
                entry.fail(InferError::Unavailable("no free KV blocks".into()));
                continue;
            };
            trace(&mut traces, id, &entry);
            let len = entry.request.input_ids.len() as u32;
            let cached = allocation.cached_tokens;
            // A chunk's end, unless its cached prefix leaves less than the chunk to compute.
            let chunk_end = chunk
                .map(|c| u64::from(cached) + c)
                .filter(|&end| end < u64::from(len))
                .map(|end| end as u32);
            let end = chunk_end.unwrap_or(len);
            requests.push(Self::shard_request(
                id,
                &entry,
                &allocation.blocks,
                cached,
                end,
                chunk_end.is_some(),
            ));
            if chunk_end.is_some() {
                partial = Some(Partial {
                    id,
                    entry,
                    blocks: allocation.blocks,
                    cached_tokens: cached,
                    done: end,
                    start,
                });
            } else {
                new.insert(id, Active::new(entry, allocation.blocks, cached, start));
            }
        }
        if requests.is_empty() {
            self.partial = partial;
            return false;
        }
        self.steps_since_prefill = 0;
        let batch_id = self.next_batch_id;
        self.next_batch_id += 1;
        // The running batches take their decode step in this call too.
        let decode_ids = if self.config.decode_in_prefill {
            std::mem::take(&mut self.running.batch_ids)
        } else {
            Vec::new()
        };
        let stepped = !decode_ids.is_empty();
        let running: Vec<u64> = if stepped {
            self.running.requests.keys().copied().collect()
        } else {
            Vec::new()
        };
        let step = Step {
            batch_ids: decode_ids.clone(),
            prefill_follows: stepped && (partial.is_some() || self.prefill_expected(1)),
        };
        let (replica, size) = (self.replica, requests.len());
        let in_chunks = partial.iter().map(|p| (p.id, &p.entry));
        let span = step_span(
            new.iter().map(|(&id, a)| (id, &a.entry)).chain(in_chunks),
            |parent| {
                info_span!(
                    parent: parent,
                    "prefill",
                    replica,
                    batch_id,
                    size,
                    running = running.len()
                )
            },
        );
        let result = self
            .client
            .prefill(
                pb::Batch {
                    id: batch_id,
                    requests,
                },
                traces,
                step,
            )
            .instrument(span)
            .await;
        if stepped {
            self.steps_since_prefill = 1;
        }
        match result {
            Ok((response, ranks)) => {
                if let Some(t) = &response.timings {
                    self.metrics
                        .prefill_duration
                        .observe(t.forward_ns as f64 / 1e9);
                }
                observe_ranks(&self.metrics.rank_prefill, &ranks);
                self.partial = partial;
                // Their prompts' blocks are written now: later prompts may share them.
                for active in new.values() {
                    self.blocks
                        .register(&active.entry.request.input_ids, &active.blocks);
                }
                let mut ids: Vec<u64> = new.keys().copied().collect();
                ids.extend(running);
                self.running.requests.extend(new);
                self.handle_generations(response.generations);
                let kept = match response.batch {
                    Some(batch) => {
                        self.running.batch_ids.push(batch.id);
                        batch.request_ids
                    }
                    None => Vec::new(),
                };
                self.reconcile(&kept, ids);
            }
            Err(e) => {
                warn!(
                    "replica {}: prefill of batch {batch_id} failed: {e}",
                    self.replica
                );
                let error = self.shard_failed(&e);
                for (_, active) in new {
                    self.blocks.release(active.blocks);
                    active.entry.fail(error.clone());
                }
                if let Some(p) = partial {
                    self.blocks.release(p.blocks);
                    p.entry.fail(error.clone());
                }
                if stepped {
                    self.fail_running(error);
                }
                for id in std::iter::once(batch_id).chain(decode_ids) {
                    let _ = self.client.clear_cache(Some(id)).await;
                }
            }
        }
        stepped
    }

    async fn decode(&mut self) {
        if self.running.batch_ids.is_empty() {
            // Everything finished on its first token already.
            self.fail_running(InferError::IncompleteGeneration);
            return;
        }
        let batch_ids = std::mem::take(&mut self.running.batch_ids);
        let (replica, size) = (self.replica, self.running.requests.len());
        let span = step_span(
            self.running.requests.iter().map(|(&id, a)| (id, &a.entry)),
            |parent| info_span!(parent: parent, "decode", replica, size),
        );
        let traces = self
            .running
            .requests
            .iter()
            .filter_map(|(&id, a)| {
                a.entry.traceparent.as_ref().map(|t| pb::RequestTrace {
                    request_id: id,
                    traceparent: t.clone(),
                })
            })
            .collect();
        let step = Step {
            batch_ids: batch_ids.clone(),
            prefill_follows: self.prefill_expected(self.steps_since_prefill.saturating_add(1)),
        };
        let result = self.client.decode(step, traces).instrument(span).await;
        self.steps_since_prefill = self.steps_since_prefill.saturating_add(1);
        match result {
            Ok((response, ranks)) => {
                if let Some(t) = &response.timings {
                    self.metrics
                        .decode_duration
                        .observe(t.forward_ns as f64 / 1e9);
                }
                observe_ranks(&self.metrics.rank_decode, &ranks);
                self.handle_generations(response.generations);
                let kept = match response.batch {
                    Some(batch) => {
                        self.running.batch_ids = vec![batch.id];
                        batch.request_ids
                    }
                    None => Vec::new(),
                };
                let all: Vec<u64> = self.running.requests.keys().copied().collect();
                self.reconcile(&kept, all);
            }
            Err(e) => {
                warn!("replica {}: decode failed: {e}", self.replica);
                let error = self.shard_failed(&e);
                self.fail_running(error);
                for id in batch_ids {
                    let _ = self.client.clear_cache(Some(id)).await;
                }
            }
        }
    }

    /// The error for the requests of a failed step; this replica takes no new
    /// requests until its health checker hears from the shards again.
    fn shard_failed(&mut self, e: &ClientError) -> InferError {
        self.health.set(Health::Down(e.to_string()));
        // What the failed step wrote (or did not) is unknown: share no cached prefix,
        // and do not continue a prompt from chunks the shard may have lost.
        self.blocks.forget_prefixes();
        let error = InferError::Generation(e.to_string());
        if let Some(p) = self.partial.take() {
            self.blocks.release(p.blocks);
            p.entry.fail(error.clone());
        }
        error
    }

    /// Fails every running request with `error` and frees its blocks.
    fn fail_running(&mut self, error: InferError) {
        for (_, active) in self.running.requests.drain() {
            self.blocks.release(active.blocks);
            active.entry.fail(error.clone());
        }
        self.running.batch_ids.clear();
    }

    /// Of `candidates` (requests that were in the step), those still running
    /// here but no longer cached on the shard are failed, never left hanging.
    fn reconcile(&mut self, kept: &[u64], candidates: Vec<u64>) {
        for id in candidates {
            if kept.contains(&id) {
                continue;
            }
            if let Some(active) = self.running.requests.remove(&id) {
                self.blocks.release(active.blocks);
                active
                    .entry
                    .fail(InferError::Generation("the shard lost this request".into()));
            }
        }
    }

    fn handle_generations(&mut self, generations: Vec<pb::Generation>) {
        for g in generations {
            let Some(active) = self.running.requests.get_mut(&g.request_id) else {
                continue;
            };
            if let Some(p) = g.prompt_logprobs {
                let prompt = PromptLogprobs {
                    logprobs: p.logprobs,
                    top: p
                        .top
                        .into_iter()
                        .map(|t| t.tokens.into_iter().map(|t| token(Some(t))).collect())
                        .collect(),
                };
                let _ = active
                    .entry
                    .response
                    .send(Ok(InferStreamResponse::Prompt(prompt)));
            }
            let top_tokens = g.top_tokens.into_iter().map(|t| token(Some(t))).collect();
            let token = token(g.token);
            active.generated += 1;
            // Like TGI's generated_text: special tokens (e.g. the EOS) are not text.
            if !token.special {
                active.text.push_str(&token.text);
            }
            match finish_reason(g.finish_reason) {
                None => {
                    // A closed channel means the client left: drop_cancelled frees it.
                    let _ = active
                        .entry
                        .response
                        .send(Ok(InferStreamResponse::Intermediate { token, top_tokens }));
                }
                Some(reason) => {
                    let Some(active) = self.running.requests.remove(&g.request_id) else {
                        continue;
                    };
                    let params = &active.entry.request.parameters;
                    active
                        .entry
                        .span
                        .record("generated_tokens", active.generated)
                        .record("finish_reason", reason.as_tgi());
                    let generated_text = GeneratedText {
                        cached_tokens: active.cached_tokens,
                        text: active.text,
                        generated_tokens: active.generated,
                        finish_reason: reason,
                        seed: params.do_sample.then_some(params.seed),
                    };
                    let _ = active.entry.response.send(Ok(InferStreamResponse::End {
                        token,
                        top_tokens,
                        generated_text,
                        queued: active.entry.queued,
                        start: active.start,
                    }));
                    self.blocks.release(active.blocks);
                }
            }
        }
    }

    /// Removes requests whose clients went away from the shard batch and frees their blocks.
    async fn drop_cancelled(&mut self) {
        let cancelled: Vec<u64> = self
            .running
            .requests
            .iter()
            .filter(|(_, a)| a.entry.response.is_closed())
            .map(|(&id, _)| id)
            .collect();
        if cancelled.is_empty() {
            return;
        }
        for id in &cancelled {
            if let Some(active) = self.running.requests.remove(id) {
                self.blocks.release(active.blocks);
            }
        }
        let keep: Vec<u64> = self.running.requests.keys().copied().collect();
        let Some(&batch_id) = self.running.batch_ids.first() else {
            return;
        };
        match self.client.filter_batch(batch_id, keep).await {
            Ok(Some(batch)) => self.running.batch_ids = vec![batch.id],
            Ok(None) => self.running.batch_ids.clear(),
            Err(e) => {
                warn!(
                    "replica {}: filtering batch {batch_id} failed: {e}",
                    self.replica
                );
                let error = self.shard_failed(&e);
                self.fail_running(error);
                let _ = self.client.clear_cache(Some(batch_id)).await;
            }
        }
        self.update_gauges();
    }
}
