//! The batched generation engine: prefill new requests into a batch, advance a
//! batch by one token per sequence, and let sequences join (merge) and leave
//! (filter) a running batch without recomputing the others.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};
use tessera_model::chat_template::{ChatMessage, ChatTemplate};
use tessera_model::config::ModelConfig;
use tessera_model::detokenize::IncrementalDecoder;
use tokenizers::Tokenizer;
use tracing::instrument;

use crate::attention::{plan_decode_groups, AttentionPlan, DecodeGroup, PromptSpan};
use crate::collectives::{Communicator, GroupConfig};
use crate::cpu_attention::{self, DecodeContexts};
use crate::error::{EngineError, Result};
use crate::json_mode::{JsonConstraint, TokenBytes};
use crate::kv_cache::KvCache;
use crate::model::{Llama, StepInput};
use crate::model_files::ModelFiles;
use crate::partition::Partition;
use crate::sampling::{SampledToken, Sampler, SamplingParams};
use crate::stage_timing;
use crate::stopping::{FinishReason, StopChecker, StoppingCriteria};

/// Most attention groups of one decode step (each adds ~8 operator calls per layer).
const MAX_DECODE_GROUPS: usize = 4;
/// A group's extra operator calls, priced in padded context rows of attention work.
const DECODE_GROUP_COST: usize = 512;

/// How to place the model and size its KV cache.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub kind: Kind,
    pub device: Device,
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool; 0 sizes the pool from `max_kv_tokens`.
    pub num_blocks: usize,
    /// Pool capacity in tokens when `num_blocks` is 0.
    pub max_kv_tokens: usize,
    /// This rank's tensor-parallel group; `None` runs the whole model alone.
    pub group: Option<GroupConfig>,
    /// Decode attention by gathering into padded groups and batched matmuls (what CUDA
    /// uses) even on the CPU, instead of the in-place kernel; for tests and comparisons.
    pub grouped_decode_attention: bool,
    /// With f32 weights on the CPU, also keep the int4/int8 copies the reduced dtypes use
    /// for decode steps of few rows (what `--dtype auto` does on a CPU without native
    /// bf16: f32 for prefill and large batches, where libtorch's bf16 matmuls would be
    /// slow there, and the compressed kernels for one or a few streams: `quant_matmul`'s
    /// integer ones on AVX2, libtorch's computing in bf16 elsewhere).
    pub small_batch_copies: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            kind: Kind::Float,
            device: Device::Cpu,
            block_size: 16,
            num_blocks: 0,
            max_kv_tokens: 16_384,
            group: None,
            grouped_decode_attention: false,
            small_batch_copies: false,
        }
    }
}

/// A new sequence to generate for. The caller owns KV block allocation: the block
/// table must hold at least `prompt.len() + max_new_tokens - 1` positions.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingCriteria,
    pub block_table: Vec<u32>,
    /// The first `cached_tokens` prompt positions are already in the KV pool (a shared
    /// prefix): the prefill computes the rest, attending to them in place.
    pub cached_tokens: usize,
    /// Also return the log-probability of every prompt token after the first, given
    /// the tokens before it (TGI's `decoder_input_details`, OpenAI's `echo` with
    /// `logprobs`). Needs the whole prompt computed: `cached_tokens` must be 0.
    pub prompt_logprobs: bool,
    /// One chunk of a chunked prefill: write the keys and values of
    /// `prompt[cached_tokens..]` into the block table and nothing else (no logits, no
    /// token, no sequence kept). A later request with the same blocks continues with
    /// `cached_tokens` at this chunk's end. The block table needs only the prompt's
    /// positions.
    pub prefill_only: bool,
}

/// The model's log-probabilities of a prompt's tokens 1.., each given the tokens
/// before it, with the `top_n_tokens` most likely tokens at each of those positions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PromptLogprobs {
    pub logprobs: Vec<f32>,
    /// Empty, or one list per entry of `logprobs`.
    pub top: Vec<Vec<TopToken>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TopToken {
    pub id: u32,
    pub logprob: f32,
    pub text: String,
    pub special: bool,
}

/// One generated token of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub request_id: u64,
    pub token_id: u32,
    pub logprob: f32,
    /// Text this token adds to the output (empty while a character is incomplete).
    pub text: String,
    pub special: bool,
    pub top_tokens: Vec<TopToken>,
    /// Set on the request's last token.
    pub finish_reason: Option<FinishReason>,
    /// On a request's first token, when it asked for them.
    pub prompt_logprobs: Option<PromptLogprobs>,
}

struct Sequence {
    id: u64,
    /// Prompt followed by generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    sampler: Sampler,
    stop: StopChecker,
    decoder: IncrementalDecoder,
    block_table: Vec<u32>,
    finished: Option<FinishReason>,
}

/// Sequences cached on this engine, advanced together.
#[derive(Default)]
pub struct Batch {
    seqs: Vec<Sequence>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.seqs.iter().map(|s| s.id).collect()
    }

    /// Appends the sequences of `other`; both keep their caches.
    pub fn merge(&mut self, other: Batch) {
        self.seqs.extend(other.seqs);
    }

    /// Keeps only `keep`; returns the block tables of the sequences dropped.
    pub fn filter(&mut self, keep: &[u64]) -> Vec<(u64, Vec<u32>)> {
        let keep: HashSet<u64> = keep.iter().copied().collect();
        let (kept, dropped): (Vec<_>, Vec<_>) = std::mem::take(&mut self.seqs)
            .into_iter()
            .partition(|s| keep.contains(&s.id));
        self.seqs = kept;
        dropped.into_iter().map(|s| (s.id, s.block_table)).collect()
    }

    /// Removes finished sequences; returns their ids and block tables.
    pub fn remove_finished(&mut self) -> Vec<(u64, Vec<u32>)> {
        let keep: Vec<u64> = self
            .seqs
            .iter()
            .filter(|s| s.finished.is_none())
            .map(|s| s.id)
            .collect();
        self.filter(&keep)
    }

    /// Generated token ids of request `id` so far.
    pub fn generated(&self, id: u64) -> Option<&[u32]> {
        self.seqs
            .iter()
            .find(|s| s.id == id)
            .map(|s| &s.tokens[s.prompt_len..])
    }

    /// Output text of request `id` so far.
    pub fn generated_text(&self, id: u64) -> Option<&str> {
        self.seqs
            .iter()
            .find(|s| s.id == id)
            .map(|s| s.stop.generated_text())
    }
}

pub struct Engine {
    /// Whether decode attention reads the KV pools in place (CPU kernel).
    in_place_attention: bool,
    /// The last step's logits on the host, reused from step to step so that its
    /// pages stay mapped (a fresh 12 MB buffer per step at batch 64 costs page faults).
    logits_rows: Vec<f32>,
    /// Page-locked staging for copying logits from a GPU: a copy into pageable memory
    /// measured 17.9 ms for batch 64 on an H100 (half the step).
    pinned_logits: Option<Tensor>,
    model: Llama,
    cache: KvCache,
    tokenizer: Tokenizer,
    special_ids: HashSet<u32>,
    eos_ids: Vec<u32>,
    /// Each token's bytes, for JSON mode's grammar.
    token_bytes: Arc<TokenBytes>,
    add_bos: Option<u32>,
    chat_template: Option<ChatTemplate>,
}

impl Engine {
    pub fn load(path: &Path, config: &EngineConfig) -> Result<Self> {
        let files = ModelFiles::open(path)?;
        let ModelFiles {
            weights,
            config: model_config,
            tokenizer,
            eos_ids,
            add_bos,
            info,
        } = files;
        // The split is checked against the configuration before any weight is read.
        let (part, comm) = match &config.group {
            Some(group) if group.world_size > 1 => {
                let part = Partition::plan(&model_config, group.rank, group.world_size)?;
                (part, Communicator::join(group)?)
            }
            _ => (Partition::single(&model_config), Communicator::single()),
        };
        let model = Llama::load(
            &weights,
            model_config,
            part,
            comm,
            config.kind,
            config.device,
            config.small_batch_copies,
        )?;
        drop(weights);
        crate::memory::release_free_memory();
        let mc = model.config();
        let num_blocks = if config.num_blocks > 0 {
            config.num_blocks
        } else {
            config.max_kv_tokens.div_ceil(config.block_size.max(1))
        };
        let cache = KvCache::new(
            mc.num_layers,
            num_blocks,
            config.block_size,
            model.partition().num_kv_heads(),
            mc.head_dim,
            config.kind,
            config.device,
        )?;
        let special_ids = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let token_bytes = Arc::new(TokenBytes::from_tokenizer(&tokenizer));
        let in_place_attention = config.device == Device::Cpu
            && cpu_attention::supports(config.kind)
            && !config.grouped_decode_attention;
        Ok(Self {
            in_place_attention,
            logits_rows: Vec::new(),
            pinned_logits: None,
            model,
            cache,
            tokenizer,
            special_ids,
            token_bytes,
            eos_ids,
            add_bos,
            chat_template: match &info.chat_template {
                Some(source) => Some(ChatTemplate::new(
                    source,
                    info.bos_token.clone().unwrap_or_default(),
                    info.eos_token.clone().unwrap_or_default(),
                )?),
                None => None,
            },
        })
    }

    pub fn model_config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.model.device()
    }

    /// Time this rank has spent exchanging activations with the other ranks.
    pub fn collective_time(&self) -> crate::collectives::CollectiveTime {
        self.model.collective_time()
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// `text` as a single user message in the model's chat template, ready for generation.
    pub fn apply_chat_template(&self, text: &str) -> Result<String> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(EngineError::NoChatTemplate)?;
        Ok(template.render(&[ChatMessage::new("user", text)], true)?)
    }

    /// Token ids of `text` as the model expects a prompt (with BOS where the model adds one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| EngineError::Encode(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let Some(bos) = self.add_bos {
            ids.push(bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    fn check_request(&self, r: &GenerateRequest) -> Result<()> {
        let bad = |message: String| EngineError::Request { id: r.id, message };
        if r.prompt.is_empty() {
            return Err(bad("the prompt has no tokens".into()));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(t) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(bad(format!(
                "token id {t} is outside the vocabulary (size {vocab})"
            )));
        }
        if r.prefill_only && r.prompt_logprobs {
            return Err(bad(
                "a prefill-only chunk returns no log-probabilities; ask for them with the \
                 whole prompt"
                    .into(),
            ));
        }
        if r.stopping.max_new_tokens == 0 {
            return Err(bad("max_new_tokens must be at least 1".into()));
        }
        if r.sampling.json_object && (r.stopping.ignore_eos || r.stopping.min_new_tokens > 0) {
            return Err(bad(
                "JSON mode ends the output when the object is complete: it cannot be combined \
                 with ignore_eos or min_new_tokens"
                    .into(),
            ));
        }
        if r.prompt_logprobs && r.cached_tokens > 0 {
            return Err(bad(
                "prompt log-probabilities need the whole prompt computed, not a cached prefix"
                    .into(),
            ));
        }
        if r.cached_tokens >= r.prompt.len() {
            return Err(bad(format!(
                "{} cached tokens leave nothing to compute of a {}-token prompt",
                r.cached_tokens,
                r.prompt.len()
            )));
        }
        let positions = if r.prefill_only {
            r.prompt.len()
        } else {
            r.prompt.len() + r.stopping.max_new_tokens as usize - 1
        };
        let capacity = r.block_table.len() * self.cache.block_size();
        if capacity < positions {
            return Err(bad(format!(
                "block table holds {capacity} positions but the request needs {positions}"
            )));
        }
        if let Some(b) = r
            .block_table
            .iter()
            .find(|&&b| b as usize >= self.cache.num_blocks())
        {
            return Err(bad(format!(
                "block {b} is outside the KV pool ({} blocks)",
                self.cache.num_blocks()
            )));
        }
        r.sampling.validate().map_err(|e| bad(e.to_string()))?;
        Ok(())
    }

    fn slot(&self, seq_id: u64, table: &[u32], pos: usize) -> Result<i64> {
        self.cache
            .slot(table, pos)
            .ok_or_else(|| EngineError::Request {
                id: seq_id,
                message: format!("position {pos} is outside its KV blocks"),
            })
    }

    fn device_i64(&self, v: &[i64]) -> Result<Tensor> {
        Ok(Tensor::f_from_slice(v)?.f_to_device(self.model.device())?)
    }

    /// Runs the prompts of `requests` in one forward pass and samples each one's first token.
    #[instrument(skip_all, fields(requests = requests.len()))]
    pub fn prefill(&mut self, requests: Vec<GenerateRequest>) -> Result<(Batch, Vec<Generation>)> {
        for r in &requests {
            self.check_request(r)?;
        }
        let mut rows = Rows::default();
        let (requests, spans) = self.prompt_rows(requests, &mut rows)?;
        let prompt_logit_rows = rows.last.len() as i64;
        let input = self.step_input(rows, AttentionPlan::Prefill(spans))?;
        let logits = self.model.forward(&mut self.cache, &input)?;
        let (logits, prompt_logprobs) =
            self.split_prompt_logprobs(&requests, &logits.f_narrow(0, 0, prompt_logit_rows)?)?;
        let mut batch = self.new_batch(requests);
        let mut generations = self.sample(&mut batch, &logits)?;
        attach_prompt_logprobs(&mut generations, prompt_logprobs);
        Ok((batch, generations))
    }

    /// Prefills `requests` and advances every unfinished sequence of `running` by one
    /// token in the same forward pass, so that the weights are read once for both:
    /// the new batch with its first tokens, and `running`'s tokens. Each sequence gets
    /// the token it would get from [`Engine::prefill`] and [`Engine::decode`] apart
    /// (up to the order of floating-point sums in the larger matmuls).
    #[instrument(skip_all, fields(requests = requests.len(), running = running.len()))]
    pub fn prefill_and_decode(
        &mut self,
        requests: Vec<GenerateRequest>,
        running: &mut Batch,
    ) -> Result<(Batch, Vec<Generation>, Vec<Generation>)> {
        if running.seqs.iter().all(|s| s.finished.is_some()) {
            let (batch, generations) = self.prefill(requests)?;
            return Ok((batch, generations, Vec::new()));
        }
        for r in &requests {
            self.check_request(r)?;
        }
        let mut rows = Rows::default();
        let (requests, spans) = self.prompt_rows(requests, &mut rows)?;
        let decode_from = rows.tokens.len() as i64;
        let prompt_logit_rows = rows.last.len() as i64;
        let Some((active, decode)) = self.decode_rows(running, &mut rows)? else {
            return Err(EngineError::Batch(
                "the running batch has no unfinished sequence to decode".into(),
            ));
        };
        let attention = AttentionPlan::Mixed {
            prefill: spans,
            decode_from,
            decode: Box::new(decode),
        };
        let input = self.step_input(rows, attention)?;
        let logits = self.model.forward(&mut self.cache, &input)?;
        let (fresh_logits, prompt_logprobs) =
            self.split_prompt_logprobs(&requests, &logits.f_narrow(0, 0, prompt_logit_rows)?)?;
        let mut batch = self.new_batch(requests);
        let mut generations = self.sample(&mut batch, &fresh_logits)?;
        attach_prompt_logprobs(&mut generations, prompt_logprobs);
        let stepped = active.len() as i64;
        let mut view = ActiveView {
            batch: running,
            active,
        };
        let advanced =
            self.sample_active(&mut view, &logits.f_narrow(0, prompt_logit_rows, stepped)?)?;
        Ok((batch, generations, advanced))
    }

    /// Appends the rows of `requests`' prompts, past their cached prefixes: first the
    /// prefill-only chunks (which need no logits), then the prompts that start a
    /// sequence. Returns those requests, in row order, and each prompt's span of rows.
    fn prompt_rows(
        &self,
        requests: Vec<GenerateRequest>,
        rows: &mut Rows,
    ) -> Result<(Vec<GenerateRequest>, Vec<PromptSpan>)> {
        let total: usize = requests
            .iter()
            .map(|r| r.prompt.len() - r.cached_tokens)
            .sum();
        rows.reserve(total);
        let (chunks, requests): (Vec<_>, Vec<_>) =
            requests.into_iter().partition(|r| r.prefill_only);
        let mut spans = Vec::with_capacity(chunks.len() + requests.len());
        for r in chunks.iter().chain(&requests) {
            let cached = r.cached_tokens;
            let prefix = if cached == 0 {
                None
            } else {
                let slots = (0..cached)
                    .map(|p| self.slot(r.id, &r.block_table, p))
                    .collect::<Result<Vec<i64>>>()?;
                Some(self.device_i64(&slots)?)
            };
            spans.push(PromptSpan {
                offset: rows.tokens.len() as i64,
                len: (r.prompt.len() - cached) as i64,
                prefix,
            });
            for (pos, &tok) in r.prompt.iter().enumerate().skip(cached) {
                if r.prompt_logprobs {
                    // Every prompt row's logits, the last one (sampled) included.
                    rows.last.push(rows.tokens.len() as i64);
                }
                rows.tokens.push(tok as i64);
                rows.positions.push(pos as i64);
                rows.slots.push(self.slot(r.id, &r.block_table, pos)?);
            }
            if !r.prompt_logprobs && !r.prefill_only {
                rows.last.push(rows.tokens.len() as i64 - 1);
            }
        }
        Ok((requests, spans))
    }

    /// Appends one row per unfinished sequence of `batch` (its newest token), shortest
    /// context first; returns those sequences' indices in the batch, in row order, and
    /// the plan of their attention. `None` when every sequence has finished.
    fn decode_rows(
        &self,
        batch: &Batch,
        rows: &mut Rows,
    ) -> Result<Option<(Vec<usize>, AttentionPlan)>> {
        let mut active: Vec<usize> = (0..batch.seqs.len())
            .filter(|&i| batch.seqs[i].finished.is_none())
            .collect();
        if active.is_empty() {
            return Ok(None);
        }
        // Shortest contexts first, so that sequences of similar lengths can share an
        // attention group (the linear layers do not care about the order).
        active.sort_by_key(|&i| batch.seqs[i].tokens.len());
        let lens: Vec<usize> = active.iter().map(|&i| batch.seqs[i].tokens.len()).collect();
        rows.reserve(active.len());
        for &i in &active {
            let s = &batch.seqs[i];
            let pos = s.tokens.len() - 1;
            rows.last.push(rows.tokens.len() as i64);
            rows.tokens.push(s.tokens[pos] as i64);
            rows.positions.push(pos as i64);
            rows.slots.push(self.slot(s.id, &s.block_table, pos)?);
        }
        let attention = if self.in_place_attention {
            // Attention reads the pools in place: only each sequence's slots are needed.
            let mut contexts = DecodeContexts::new();
            for &i in &active {
                let s = &batch.seqs[i];
                let context = (0..s.tokens.len())
                    .map(|p| self.slot(s.id, &s.block_table, p))
                    .collect::<Result<Vec<i64>>>()?;
                contexts.push(context);
            }
            AttentionPlan::DecodeInPlace(contexts)
        } else {
            AttentionPlan::Decode(self.decode_groups(batch, &active, &lens)?)
        };
        Ok(Some((active, attention)))
    }

    /// Moves `rows` to the model's device.
    fn step_input(&self, rows: Rows, attention: AttentionPlan) -> Result<StepInput> {
        Ok(StepInput {
            tokens: self.device_i64(&rows.tokens)?,
            positions: self.device_i64(&rows.positions)?,
            slots: self.device_i64(&rows.slots)?,
            last_index: self.device_i64(&rows.last)?,
            slots_host: rows.slots,
            attention,
        })
    }

    /// The batch of freshly prefilled `requests` (their first tokens not sampled yet).
    fn new_batch(&self, requests: Vec<GenerateRequest>) -> Batch {
        Batch {
            seqs: requests
                .into_iter()
                .map(|r| Sequence {
                    id: r.id,
                    sampler: self.sampler(r.sampling, &r.prompt),
                    stop: StopChecker::new(r.stopping),
                    decoder: IncrementalDecoder::new(&r.prompt, false),
                    prompt_len: r.prompt.len(),
                    tokens: r.prompt,
                    block_table: r.block_table,
                    finished: None,
                })
                .collect(),
        }
    }

    /// A sequence's sampler, with JSON mode's grammar when its parameters ask for it.
    fn sampler(&self, params: SamplingParams, prompt: &[u32]) -> Sampler {
        let json = params.json_object;
        let mut sampler = Sampler::new(params, prompt);
        if json {
            sampler.constrain(JsonConstraint::new(
                self.token_bytes.clone(),
                self.eos_ids.clone(),
            ));
        }
        sampler
    }

    /// The f32 logits after `prompt` (its last position), from a prefill pass that
    /// writes the prompt's keys and values into `block_table`'s blocks. For checks
    /// against reference implementations; generation uses [`Engine::prefill`].
    pub fn last_logits(&mut self, prompt: &[u32], block_table: &[u32]) -> Result<Vec<f32>> {
        let request = GenerateRequest {
            id: u64::MAX,
            prompt: prompt.to_vec(),
            sampling: SamplingParams::default(),
            stopping: StoppingCriteria {
                max_new_tokens: 1,
                ..StoppingCriteria::default()
            },
            block_table: block_table.to_vec(),
            cached_tokens: 0,
            prompt_logprobs: false,
            prefill_only: false,
        };
        self.check_request(&request)?;
        let n = prompt.len() as i64;
        let slots = (0..prompt.len())
            .map(|p| self.slot(request.id, block_table, p))
            .collect::<Result<Vec<_>>>()?;
        let tokens: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
        let positions: Vec<i64> = (0..n).collect();
        let input = StepInput {
            tokens: self.device_i64(&tokens)?,
            positions: self.device_i64(&positions)?,
            slots: self.device_i64(&slots)?,
            slots_host: slots,
            last_index: self.device_i64(&[n - 1])?,
            attention: AttentionPlan::Prefill(vec![PromptSpan {
                offset: 0,
                len: n,
                prefix: None,
            }]),
        };
        let logits = self.model.forward(&mut self.cache, &input)?;
        Ok(Vec::<f32>::try_from(
            logits.f_to_device(Device::Cpu)?.f_flatten(0, -1)?,
        )?)
    }

    /// Advances every unfinished sequence of `batch` by one token.
    #[instrument(skip_all, fields(batch = batch.len()))]
    pub fn decode(&mut self, batch: &mut Batch) -> Result<Vec<Generation>> {
        stage_timing::start(self.model.device());
        // Stopped on every path, errors included, so no later prefill counts as a stage.
        let generations = self.decode_step(batch);
        stage_timing::finish();
        generations
    }

    fn decode_step(&mut self, batch: &mut Batch) -> Result<Vec<Generation>> {
        let mut rows = Rows::default();
        let Some((active, attention)) = self.decode_rows(batch, &mut rows)? else {
            return Ok(Vec::new());
        };
        let input = self.step_input(rows, attention)?;
        stage_timing::mark("step_inputs");
        let logits = self.model.forward(&mut self.cache, &input)?;
        let mut view = ActiveView { batch, active };
        self.sample_active(&mut view, &logits)
    }

    /// Gather indices and masks for the grouped decode attention (devices other than
    /// the CPU): `active` sorted by context length, `lens` their lengths.
    fn decode_groups(
        &self,
        batch: &Batch,
        active: &[usize],
        lens: &[usize],
    ) -> Result<Vec<DecodeGroup>> {
        let kv_heads = self.model.partition().num_kv_heads();
        let device = self.model.device();
        let mut groups = Vec::new();
        for (start, end) in plan_decode_groups(lens, MAX_DECODE_GROUPS, DECODE_GROUP_COST) {
            let max_len = lens[end - 1];
            let count = end - start;
            // Pool rows (pool viewed as [slots * kv_heads, head_dim]) of every context
            // position, ordered by sequence, KV head, position: see DecodeGroup.
            let mut rows = vec![0i64; count * kv_heads * max_len];
            let mut mask = vec![f32::NEG_INFINITY; count * max_len];
            let mut context = vec![0i64; max_len];
            for (row, &i) in active[start..end].iter().enumerate() {
                let s = &batch.seqs[i];
                let pos = s.tokens.len() - 1;
                // Padding points at the sequence's own first slot, which always holds
                // finite values, so that the -inf mask can never meet garbage.
                context.fill(self.slot(s.id, &s.block_table, 0)?);
                for (p, slot) in context.iter_mut().enumerate().take(pos + 1) {
                    *slot = self.slot(s.id, &s.block_table, p)?;
                }
                mask[row * max_len..row * max_len + pos + 1].fill(0.0);
                for h in 0..kv_heads {
                    let out = &mut rows[(row * kv_heads + h) * max_len..][..max_len];
                    for (dst, &slot) in out.iter_mut().zip(&context) {
                        *dst = slot * kv_heads as i64 + h as i64;
                    }
                }
            }
            let (count, len) = (count as i64, max_len as i64);
            groups.push(DecodeGroup {
                start: start as i64,
                count,
                len,
                rows: self.device_i64(&rows)?,
                mask: Tensor::f_from_slice(&mask)?
                    .f_view([count, 1, 1, len])?
                    .f_to_device(device)?,
            });
        }
        Ok(groups)
    }

    fn sample(&mut self, batch: &mut Batch, logits: &Tensor) -> Result<Vec<Generation>> {
        let active = (0..batch.seqs.len()).collect();
        let mut view = ActiveView { batch, active };
        self.sample_active(&mut view, logits)
    }

    /// Splits the logits of a prefill's prompt rows (one per request, or every prompt
    /// row of the requests that asked for prompt log-probabilities) into one row per
    /// request to sample from, and those requests' prompt log-probabilities.
    fn split_prompt_logprobs(
        &self,
        requests: &[GenerateRequest],
        logits: &Tensor,
    ) -> Result<(Tensor, HashMap<u64, PromptLogprobs>)> {
        let mut found = HashMap::new();
        if !requests.iter().any(|r| r.prompt_logprobs) {
            return Ok((logits.shallow_clone(), found));
        }
        let mut sample_rows = Vec::with_capacity(requests.len());
        let mut row = 0i64;
        for r in requests {
            if !r.prompt_logprobs {
                sample_rows.push(row);
                row += 1;
                continue;
            }
            let len = r.prompt.len() as i64;
            if len > 1 {
                let rows = logits.f_narrow(0, row, len - 1)?;
                found.insert(r.id, self.prompt_logprobs_of(r, &rows)?);
            } else {
                found.insert(r.id, PromptLogprobs::default());
            }
            row += len;
            sample_rows.push(row - 1);
        }
        let index = self.device_i64(&sample_rows)?;
        Ok((logits.f_index_select(0, &index)?, found))
    }

    /// `rows`: the logits of prompt positions 0..len-1, which predict tokens 1..len.
    fn prompt_logprobs_of(&self, r: &GenerateRequest, rows: &Tensor) -> Result<PromptLogprobs> {
        let log_probs = rows.f_log_softmax(-1, Kind::Float)?;
        let targets: Vec<i64> = r.prompt[1..].iter().map(|&t| t as i64).collect();
        let targets = self.device_i64(&targets)?.f_unsqueeze(1)?;
        let chosen = log_probs.f_gather(1, &targets, false)?.f_flatten(0, -1)?;
        let logprobs = Vec::<f32>::try_from(&chosen.f_to_device(Device::Cpu)?)?;
        let n = r
            .sampling
            .top_n_tokens
            .min(crate::sampling::MAX_TOP_N_TOKENS) as i64;
        let mut top = Vec::new();
        if n > 0 {
            let (values, ids) = log_probs.f_topk(n, -1, true, true)?;
            let values = Vec::<f32>::try_from(&values.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
            let ids = Vec::<i64>::try_from(&ids.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
            top = values
                .chunks(n as usize)
                .zip(ids.chunks(n as usize))
                .map(|(values, ids)| {
                    values
                        .iter()
                        .zip(ids)
                        .map(|(&logprob, &id)| self.top_token(id as u32, logprob))
                        .collect()
                })
                .collect();
        }
        Ok(PromptLogprobs { logprobs, top })
    }

    fn top_token(&self, id: u32, logprob: f32) -> TopToken {
        TopToken {
            id,
            logprob,
            text: self.token_text(id),
            special: self.special_ids.contains(&id),
        }
    }

    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    /// `logits` (f32, any device) copied into the reused host buffer, which the caller
    /// hands back through `self.logits_rows` when done.
    fn logits_to_host(&mut self, logits: &Tensor) -> Result<Vec<f32>> {
        let flat = logits.f_flatten(0, -1)?;
        let n = flat.numel();
        let mut rows = std::mem::take(&mut self.logits_rows);
        rows.resize(n, 0.0);
        if flat.device() == Device::Cpu {
            flat.f_copy_data(&mut rows, n)?;
            return Ok(rows);
        }
        let staging = match &self.pinned_logits {
            Some(staging) if staging.numel() >= n => staging.shallow_clone(),
            _ => {
                let staging = Tensor::f_empty([n as i64], (Kind::Float, Device::Cpu))?
                    .f_pin_memory(flat.device())?;
                self.pinned_logits = Some(staging.shallow_clone());
                staging
            }
        };
        let mut window = staging.f_narrow(0, 0, n as i64)?;
        window.f_copy_(&flat)?;
        window.f_copy_data(&mut rows, n)?;
        Ok(rows)
    }

    fn sample_active(
        &mut self,
        view: &mut ActiveView<'_>,
        logits: &Tensor,
    ) -> Result<Vec<Generation>> {
        let vocab = self.model.config().vocab_size;
        let mut rows = self.logits_to_host(logits)?;
        stage_timing::mark("logits_to_host");
        let seqs = &mut view.batch.seqs;
        // Each active sequence with its own logits row (indices are distinct).
        let mut pairs: Vec<(&mut Sequence, &mut [f32])> = Vec::with_capacity(view.active.len());
        let mut by_index: Vec<Option<&mut Sequence>> = seqs.iter_mut().map(Some).collect();
        for (row, &i) in rows.chunks_mut(vocab).zip(view.active.iter()) {
            let seq = by_index
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| EngineError::Batch(format!("sequence {i} is not in the batch")))?;
            let criteria = seq.stop.criteria();
            if !criteria.ignore_eos && seq.stop.generated_tokens() < criteria.min_new_tokens {
                // Too early to end: EOS may not be chosen (vLLM's `min_tokens`).
                for &eos in &criteria.eos_token_ids {
                    if let Some(logit) = row.get_mut(eos as usize) {
                        *logit = f32::NEG_INFINITY;
                    }
                }
            }
            pairs.push((seq, row));
        }
        // Sampling reads a whole vocabulary row per sequence: the rows are spread over
        // libtorch's threads (each sequence has its own sampler and random stream, so the
        // result does not depend on the split).
        let sampled = sample_rows(&mut pairs)?;
        stage_timing::mark("sampling");
        let mut out = Vec::with_capacity(pairs.len());
        for ((seq, _), sampled) in pairs.into_iter().zip(sampled) {
            seq.tokens.push(sampled.id);
            let text = seq.decoder.step(&self.tokenizer, sampled.id).map_err(|e| {
                EngineError::Request {
                    id: seq.id,
                    message: e.to_string(),
                }
            })?;
            let mut text = text;
            let finish = seq.stop.push(sampled.id, &text);
            if finish.is_some() {
                // An incomplete character at the very end comes out as U+FFFD, as in a full decode.
                let rest =
                    seq.decoder
                        .flush(&self.tokenizer)
                        .map_err(|e| EngineError::Request {
                            id: seq.id,
                            message: e.to_string(),
                        })?;
                text.push_str(&rest);
            }
            seq.finished = finish;
            out.push(Generation {
                request_id: seq.id,
                token_id: sampled.id,
                logprob: sampled.logprob,
                text,
                special: self.special_ids.contains(&sampled.id),
                top_tokens: sampled
                    .top
                    .iter()
                    .map(|&(id, logprob)| self.top_token(id, logprob))
                    .collect(),
                finish_reason: finish,
                prompt_logprobs: None,
            });
        }
        self.logits_rows = rows;
        stage_timing::mark("detokenize");
        Ok(out)
    }
}

/// Puts each request's prompt log-probabilities on its first generation.
fn attach_prompt_logprobs(generations: &mut [Generation], mut found: HashMap<u64, PromptLogprobs>) {
    if found.is_empty() {
        return;
    }
    for g in generations {
        g.prompt_logprobs = found.remove(&g.request_id);
    }
}

/// A sequence's sampler, its logits row and the token sampled from it.
type SampleCell<'a> = (&'a mut Sampler, &'a mut [f32], Option<SampledToken>);

/// Samples one token per `(sequence, logits row)`, rows in parallel.
fn sample_rows(pairs: &mut [(&mut Sequence, &mut [f32])]) -> Result<Vec<SampledToken>> {
    let cells: Vec<std::sync::Mutex<SampleCell>> = pairs
        .iter_mut()
        .map(|(seq, row)| std::sync::Mutex::new((&mut seq.sampler, &mut **row, None)))
        .collect();
    crate::parallel::for_each(cells.len(), &|i| {
        if let Some(Ok(mut cell)) = cells.get(i).map(|c| c.lock()) {
            let (sampler, row, out) = &mut *cell;
            *out = Some(sampler.sample(row));
        }
    })
    .map_err(|e| EngineError::Batch(format!("sampling: {e}")))?;
    cells
        .into_iter()
        .map(|cell| {
            cell.into_inner()
                .ok()
                .and_then(|(_, _, out)| out)
                .ok_or_else(|| EngineError::Batch("a sequence was not sampled".into()))
        })
        .collect()
}

/// The host-side rows of one forward pass, before they go to the device.
#[derive(Default)]
struct Rows {
    tokens: Vec<i64>,
    positions: Vec<i64>,
    slots: Vec<i64>,
    /// The row of each sequence's newest token, whose logits the pass returns.
    last: Vec<i64>,
}

impl Rows {
    fn reserve(&mut self, n: usize) {
        self.tokens.reserve(n);
        self.positions.reserve(n);
        self.slots.reserve(n);
    }
}

struct ActiveView<'a> {
    batch: &'a mut Batch,
    active: Vec<usize>,
}
