//! Per-sequence token sampling: penalties, temperature, truncation (top-k,
//! top-p, typical-p, min-p), a seeded draw, and the log-probabilities that are
//! reported back to clients.
//!
//! One [`Sampler`] lives with each sequence for its whole generation. It owns
//! its random number generator (so a fixed seed reproduces the same tokens from
//! the same logits), the token counts the penalties need, and scratch buffers
//! that are reused from step to step.
//!
//! Processing order for one step, on the sequence's row of raw logits:
//!
//! 1. NaN → `-inf`, `+inf` → `f32::MAX` (nothing below can panic or produce NaN).
//! 2. Log-softmax statistics of the *raw* row: the reported `logprob` and `top`
//!    alternatives always describe the model's distribution, before any
//!    penalty, temperature or truncation (vLLM's default behaviour).
//! 3. Repetition penalty (Hugging Face semantics, over prompt + generated tokens),
//!    then frequency and presence penalties (OpenAI semantics, over generated
//!    tokens only).
//! 4. Greedy decoding (`do_sample == false` or `temperature <= 0`): argmax,
//!    ties broken towards the lowest token id. Otherwise temperature, top-k,
//!    top-p, typical-p and min-p, each on the distribution left by the previous
//!    step, and a draw from the renormalised survivors.
//!
//! Cost: greedy decoding is a few linear, branch-light passes over the row (no
//! sort, no allocation). Sampling sorts only the tokens that survive a
//! pre-filter (top-k selection with a bounded buffer, or a provably safe
//! probability threshold for top-p).

use std::cmp::Ordering;
use std::collections::HashMap;

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::json_mode::JsonConstraint;

/// The largest accepted `top_n_tokens`.
pub const MAX_TOP_N_TOKENS: u32 = 20;

/// The largest `logit_bias` magnitude, as in OpenAI's API.
pub const MAX_LOGIT_BIAS: f32 = 100.0;

/// Sampling parameters of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature. `<= 0` (or `do_sample == false`) means greedy.
    pub temperature: f32,
    /// Draw from the distribution; `false` means greedy decoding.
    pub do_sample: bool,
    /// Keep only the `top_k` most likely tokens; `0` disables it.
    pub top_k: u32,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose
    /// probability reaches `top_p`; `1.0` disables it.
    pub top_p: f32,
    /// Locally typical sampling mass; `1.0` disables it.
    pub typical_p: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely
    /// token's; `0.0` disables it.
    pub min_p: f32,
    /// Hugging Face repetition penalty over prompt and generated tokens:
    /// positive logits are divided by it, negative ones multiplied. `1.0` is off.
    pub repetition_penalty: f32,
    /// OpenAI frequency penalty over generated tokens: `logit -= f * count`.
    pub frequency_penalty: f32,
    /// OpenAI presence penalty over generated tokens: `logit -= p` if seen.
    pub presence_penalty: f32,
    /// Seed of the sequence's random generator; `None` picks a random one.
    pub seed: Option<u64>,
    /// How many top alternatives (with log-probabilities) to report per token.
    pub top_n_tokens: u32,
    /// OpenAI `logit_bias`: `(token, bias)` pairs added to those tokens'
    /// logits after the penalties, at every step (-100 bans a token in
    /// practice, 100 makes it the only choice). Ids past the vocabulary are
    /// ignored.
    pub logit_bias: Vec<(u32, f32)>,
    /// JSON mode: the output is one JSON object (tokens that cannot continue it are
    /// masked; see [`crate::json_mode`]). The engine gives the sampler its
    /// constraint ([`Sampler::constrain`]).
    pub json_object: bool,
}

impl Default for SamplingParams {
    /// Greedy decoding with every penalty and truncation turned off.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            do_sample: false,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: None,
            top_n_tokens: 0,
            logit_bias: Vec::new(),
            json_object: false,
        }
    }
}

/// A sampling parameter outside its allowed range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    /// `name` is the parameter, `allowed` a human-readable range.
    #[error("`{name}` must be {allowed}, got {value}")]
    OutOfRange {
        name: &'static str,
        allowed: &'static str,
        value: String,
    },
}

fn out_of_range(name: &'static str, allowed: &'static str, value: impl ToString) -> SamplingError {
    SamplingError::OutOfRange {
        name,
        allowed,
        value: value.to_string(),
    }
}

impl SamplingParams {
    /// Checks every parameter's range. NaN is rejected everywhere.
    pub fn validate(&self) -> Result<(), SamplingError> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(out_of_range("temperature", "a finite number >= 0", t));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(out_of_range("top_p", "in (0, 1]", self.top_p));
        }
        if !(self.typical_p > 0.0 && self.typical_p <= 1.0) {
            return Err(out_of_range("typical_p", "in (0, 1]", self.typical_p));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(out_of_range("min_p", "in [0, 1]", self.min_p));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0) {
            return Err(out_of_range("repetition_penalty", "a finite number > 0", r));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(out_of_range(
                "frequency_penalty",
                "in [-2, 2]",
                self.frequency_penalty,
            ));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(out_of_range(
                "presence_penalty",
                "in [-2, 2]",
                self.presence_penalty,
            ));
        }
        if self.top_n_tokens > MAX_TOP_N_TOKENS {
            return Err(out_of_range(
                "top_n_tokens",
                "in [0, 20]",
                self.top_n_tokens,
            ));
        }
        if let Some(&(token, bias)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(b))
        {
            return Err(out_of_range(
                "logit_bias",
                "in [-100, 100] for every token",
                format!("{bias} for token {token}"),
            ));
        }
        Ok(())
    }

    /// Whether these parameters decode greedily (argmax after penalties).
    pub fn is_greedy(&self) -> bool {
        // NaN temperature counts as greedy too.
        !self.do_sample
            || self.temperature.is_nan()
            || self.temperature <= 0.0
            || !(1.0 / self.temperature).is_finite()
    }
}

/// The token chosen at one step, with log-probabilities of the raw model
/// distribution (log-softmax of the logits before penalties, temperature and
/// truncation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampledToken {
    pub id: u32,
    /// Model log-probability of `id`. `-inf` only if the model gave the
    /// chosen token no probability at all (possible only in the fallbacks for
    /// rows without a finite logit).
    pub logprob: f32,
    /// The `top_n_tokens` most likely tokens by model log-probability, best
    /// first, ties broken towards the lower id. Independent of the choice.
    pub top: Vec<(u32, f32)>,
}

/// Candidate set during truncation.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cands {
    /// Every token of the row; the row holds weights.
    All,
    /// The tokens listed in `Sampler::cand`; the row holds their weights.
    /// `true` when the list is sorted by descending weight (ties: lower id).
    List { sorted: bool },
}

/// Sampling state of one sequence.
///
/// Call [`Sampler::sample`] once per decode step with the sequence's logits;
/// it records the returned token for the penalties itself. Use
/// [`Sampler::record_generated`] only for tokens that reach the sequence
/// without going through `sample` (for example when rebuilding a sampler
/// for a sequence that already generated tokens).
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    seed: u64,
    rng: ChaCha8Rng,
    greedy: bool,
    penalties_on: bool,
    /// `logit_bias` with its ids sorted and unique (the last bias given for
    /// an id wins) and non-finite or zero biases dropped.
    bias: Vec<(u32, f32)>,
    /// JSON mode's grammar state, advanced with every recorded token.
    json: Option<JsonConstraint>,
    /// `(token, generated count)` for every token of the prompt or the
    /// generation (prompt-only tokens have count 0). Only kept when a
    /// penalty is active.
    seen: Vec<(u32, u32)>,
    /// Token → index into `seen`.
    seen_index: HashMap<u32, usize>,
    generated: usize,
    /// Scratch: candidate token ids.
    cand: Vec<u32>,
    /// Scratch: `(key, token)` pairs for typical-p.
    keyed: Vec<(f32, u32)>,
    /// Scratch: raw logits of penalised tokens, restored for reporting.
    saved: Vec<(u32, f32)>,
    /// Scratch: sums of the weights of each `SUM_BLOCK` entries of the row,
    /// so that a draw over the whole row does not scan it entry by entry.
    block_sums: Vec<f64>,
}

impl Sampler {
    /// A sampler for a sequence whose prompt is `prompt_tokens`.
    ///
    /// `params` should have passed [`SamplingParams::validate`]; values out of
    /// range do not panic but are treated as "off" (or as greedy for the
    /// temperature).
    pub fn new(params: SamplingParams, prompt_tokens: &[u32]) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| rand::rng().next_u64());
        let greedy = params.is_greedy();
        let rep = params.repetition_penalty;
        let penalties_on = (rep.is_finite() && rep > 0.0 && rep != 1.0)
            || (params.frequency_penalty.is_finite() && params.frequency_penalty != 0.0)
            || (params.presence_penalty.is_finite() && params.presence_penalty != 0.0);
        let bias = normalized_bias(&params.logit_bias);
        let mut sampler = Sampler {
            params,
            seed,
            rng: ChaCha8Rng::seed_from_u64(seed),
            greedy,
            penalties_on,
            bias,
            json: None,
            seen: Vec::new(),
            seen_index: HashMap::new(),
            generated: 0,
            cand: Vec::new(),
            keyed: Vec::new(),
            saved: Vec::new(),
            block_sums: Vec::new(),
        };
        if penalties_on {
            for &t in prompt_tokens {
                sampler.entry(t);
            }
        }
        sampler
    }

    /// Restricts every choice to what `constraint` allows (JSON mode).
    pub fn constrain(&mut self, constraint: JsonConstraint) {
        self.json = Some(constraint);
    }

    /// The effective seed (the request's, or the random one picked for it).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// How many tokens were recorded as generated.
    pub fn generated_len(&self) -> usize {
        self.generated
    }

    fn entry(&mut self, token: u32) -> usize {
        let next = self.seen.len();
        let idx = *self.seen_index.entry(token).or_insert(next);
        if idx == next {
            self.seen.push((token, 0));
        }
        idx
    }

    /// Records `token` as generated, for the frequency, presence and
    /// repetition penalties. [`Sampler::sample`] calls this for the token it
    /// returns; call it yourself only for tokens generated another way.
    pub fn record_generated(&mut self, token: u32) {
        self.generated += 1;
        if let Some(json) = &mut self.json {
            json.advance(token);
        }
        if self.penalties_on {
            let idx = self.entry(token);
            if let Some(e) = self.seen.get_mut(idx) {
                e.1 = e.1.saturating_add(1);
            }
        }
    }

    /// Chooses the next token from `logits`, this sequence's row of raw model
    /// logits (one per vocabulary entry), and records it as generated.
    ///
    /// `logits` is used as scratch and holds unspecified values afterwards.
    /// NaN logits count as `-inf`. If no token has a finite logit after the
    /// penalties, the argmax of the raw row is returned (token 0 when the
    /// whole row is `-inf`/NaN or empty).
    pub fn sample(&mut self, logits: &mut [f32]) -> SampledToken {
        let tok = self.choose(logits, None);
        self.record_generated(tok.id);
        tok
    }

    /// Like [`Sampler::sample`], with the row's log-sum-exp computed by the
    /// caller (e.g. `logits.logsumexp(-1)` on the accelerator for the whole
    /// batch at once), which saves the one pass over the row that needs an
    /// exponential per entry: greedy decoding then costs two comparison
    /// passes. A non-finite `logsumexp` (as a row with NaN produces) is
    /// ignored and computed here instead.
    pub fn sample_with_logsumexp(&mut self, logits: &mut [f32], logsumexp: f32) -> SampledToken {
        let tok = self.choose(logits, Some(logsumexp));
        self.record_generated(tok.id);
        tok
    }

    fn choose(&mut self, logits: &mut [f32], given_lse: Option<f32>) -> SampledToken {
        let n = logits.len();
        if n == 0 {
            return SampledToken {
                id: 0,
                logprob: f32::NEG_INFINITY,
                top: Vec::new(),
            };
        }

        // 1. Sanitise (only when needed) and gather raw statistics.
        let (mut raw_max, clean) = max_and_check(logits);
        if !clean {
            raw_max = sanitize_and_max(logits);
        }
        let raw_argmax = first_index_of(logits, raw_max);
        // log Z relative to raw_max; for an all -inf row report a uniform
        // distribution rather than NaN.
        let raw_log_sum = if raw_max == f32::NEG_INFINITY {
            None
        } else {
            match given_lse {
                Some(lse) if clean && lse.is_finite() => Some(lse as f64 - raw_max as f64),
                _ => Some(sum_exp_scaled(logits, raw_max, 1.0).ln()),
            }
        };
        let logprob_of = |x: f32| -> f32 {
            match raw_log_sum {
                Some(ls) => ((x as f64 - raw_max as f64) - ls) as f32,
                None => -(n as f64).ln() as f32,
            }
        };
        let top_n = (self.params.top_n_tokens.min(MAX_TOP_N_TOKENS) as usize).min(n);
        let top: Vec<(u32, f32)> = if top_n > 0 {
            top_n_raw(logits, top_n)
                .into_iter()
                .map(|(id, x)| (id, logprob_of(x)))
                .collect()
        } else {
            Vec::new()
        };

        // 2. Penalties and logit bias (sparse, in place; raw values saved
        //    for reporting).
        self.saved.clear();
        if self.penalties_on {
            self.apply_penalties(logits);
        }
        if !self.bias.is_empty() {
            self.apply_bias(logits);
        }
        // The grammar last: a masked token is never chosen, so its raw logit need not
        // be kept.
        let masked = match &mut self.json {
            Some(json) => {
                json.mask(logits);
                true
            }
            None => false,
        };
        let raw_logit = |saved: &[(u32, f32)], logits: &[f32], id: u32| -> f32 {
            saved
                .iter()
                .find(|(t, _)| *t == id)
                .map(|&(_, x)| x)
                .or_else(|| logits.get(id as usize).copied())
                .unwrap_or(f32::NEG_INFINITY)
        };

        // 3. Choose.
        let (pen_max, pen_argmax) = if self.saved.is_empty() && !masked {
            (raw_max, raw_argmax)
        } else {
            let m = max_of(logits);
            (m, first_index_of(logits, m))
        };
        let (id, raw_x) = if pen_max == f32::NEG_INFINITY {
            let id = raw_argmax as u32;
            (id, raw_logit(&self.saved, logits, id))
        } else if self.greedy {
            let id = pen_argmax as u32;
            (id, raw_logit(&self.saved, logits, id))
        } else {
            match self.draw(logits, pen_max) {
                Some((id, pen_x)) => {
                    let id = id as u32;
                    let saved = self.saved.iter().find(|(t, _)| *t == id);
                    (id, saved.map_or(pen_x, |&(_, x)| x))
                }
                // Only reachable through rounding; the row now holds
                // weights, whose maximum is at the penalised argmax.
                None => {
                    let id = pen_argmax as u32;
                    let saved = self.saved.iter().find(|(t, _)| *t == id);
                    (id, saved.map_or(pen_max, |&(_, x)| x))
                }
            }
        };
        let logprob = logprob_of(raw_x);
        SampledToken { id, logprob, top }
    }

    fn apply_penalties(&mut self, logits: &mut [f32]) {
        let rep = self.params.repetition_penalty;
        let rep = if rep.is_finite() && rep > 0.0 {
            rep
        } else {
            1.0
        };
        let freq = finite_or_zero(self.params.frequency_penalty);
        let pres = finite_or_zero(self.params.presence_penalty);
        for &(tok, count) in &self.seen {
            let Some(x) = logits.get_mut(tok as usize) else {
                continue;
            };
            let raw = *x;
            let mut v = raw;
            if rep != 1.0 {
                v = if v < 0.0 { v * rep } else { v / rep };
            }
            if count > 0 {
                v -= freq * count as f32 + pres;
            }
            if v.is_nan() {
                v = f32::NEG_INFINITY;
            }
            if v != raw {
                self.saved.push((tok, raw));
                *x = v;
            }
        }
    }

    /// Adds `logit_bias` after the penalties. A token the penalties already
    /// changed keeps the raw logit they saved.
    fn apply_bias(&mut self, logits: &mut [f32]) {
        let penalised = self.saved.len();
        self.saved[..penalised].sort_unstable_by_key(|&(t, _)| t);
        for &(tok, bias) in &self.bias {
            let Some(x) = logits.get_mut(tok as usize) else {
                continue;
            };
            let raw = *x;
            let mut v = raw + bias;
            if v.is_nan() {
                v = f32::NEG_INFINITY;
            }
            if v != raw {
                let already_saved = self.saved[..penalised]
                    .binary_search_by_key(&tok, |&(t, _)| t)
                    .is_ok();
                if !already_saved {
                    self.saved.push((tok, raw));
                }
                *x = v;
            }
        }
    }

    /// Temperature, truncation and the draw. `max` is the row's (finite)
    /// maximum after penalties. Returns the token and its penalised logit,
    /// or `None` if nothing could be drawn. Overwrites (part of) the row with
    /// unnormalised probabilities.
    fn draw(&mut self, row: &mut [f32], max: f32) -> Option<(usize, f32)> {
        let inv_t = 1.0 / self.params.temperature;
        let (cands, total) = self.truncate(row, max, inv_t)?;
        let id = self.draw_from(row, cands, total)?;
        // Recover the logit from its weight w = exp((x - max) / T): accurate
        // to ~1e-7 * T, since w is a normal float (tiny ones are flushed to 0
        // and never drawn).
        let w = *row.get(id)?;
        let x = max as f64 + (w as f64).ln() / inv_t as f64;
        Some((id, x as f32))
    }

    /// Temperature and truncation: turns the (penalised) row into weights
    /// and leaves the surviving tokens in `self.cand` (or all of the row).
    /// Returns the candidate set and its total weight (> 0).
    fn truncate(&mut self, row: &mut [f32], max: f32, inv_t: f32) -> Option<(Cands, f64)> {
        let n = row.len();
        let p = &self.params;
        let top_k = p.top_k as usize;
        let top_p = if p.top_p > 0.0 && p.top_p < 1.0 {
            p.top_p
        } else {
            1.0
        };
        let typical_p = if p.typical_p > 0.0 && p.typical_p < 1.0 {
            p.typical_p
        } else {
            1.0
        };
        let min_p = if p.min_p > 0.0 && p.min_p <= 1.0 {
            p.min_p
        } else {
            0.0
        };

        // Temperature + top-k. Weights w = exp((x - max) / T) are written
        // into the row (only at candidate positions when top-k is active).
        let mut cands;
        let mut total: f64;
        if top_k > 0 && top_k < n {
            top_k_select(row, top_k, &mut self.cand);
            total = 0.0;
            for &i in &self.cand {
                let w = exp_nonpos((row[i as usize] - max) * inv_t);
                row[i as usize] = w;
                total += w as f64;
            }
            cands = Cands::List { sorted: true };
        } else {
            total = exp_in_place(row, max, inv_t, &mut self.block_sums);
            cands = Cands::All;
        }
        if total.is_nan() || total <= 0.0 {
            return None;
        }

        if top_p < 1.0 {
            if cands == Cands::All {
                // No token whose weight is below (1 - p) * total / n can be in
                // the nucleus: every such token has more than p * total
                // probability mass ranked above it. Halved for rounding.
                let threshold = ((1.0 - top_p as f64) * total / n as f64 * 0.5) as f32;
                self.cand.clear();
                self.cand.extend(
                    row.iter()
                        .enumerate()
                        .filter(|&(_, &w)| w > 0.0 && w >= threshold)
                        .map(|(i, _)| i as u32),
                );
            }
            if cands != (Cands::List { sorted: true }) {
                sort_by_weight(&mut self.cand, row);
            }
            let target = top_p as f64 * total;
            let mut cum = 0.0f64;
            let mut keep = self.cand.len();
            for (j, &i) in self.cand.iter().enumerate() {
                cum += row[i as usize] as f64;
                if cum >= target {
                    keep = j + 1;
                    break;
                }
            }
            self.cand.truncate(keep.max(1));
            cands = Cands::List { sorted: true };
            total = self.cand.iter().map(|&i| row[i as usize] as f64).sum();
        }

        if typical_p < 1.0 {
            // Entropy of the renormalised distribution q = w / total:
            // H = ln(total) - Σ w ln w / total.
            let log_total = total.ln();
            let w_ln_w = |w: f32| {
                if w > 0.0 {
                    w as f64 * (w as f64).ln()
                } else {
                    0.0
                }
            };
            let entropy = match cands {
                Cands::All => log_total - row.iter().map(|&w| w_ln_w(w)).sum::<f64>() / total,
                Cands::List { .. } => {
                    log_total
                        - self
                            .cand
                            .iter()
                            .map(|&i| w_ln_w(row[i as usize]))
                            .sum::<f64>()
                            / total
                }
            };
            if cands == Cands::All {
                // A token with q < e^(-2H) ranks (by |-ln q - H|) after every
                // token more likely than itself, so at most n q of the mass
                // ranks at or after it; if n q < 1 - typical_p, the kept set
                // is complete before reaching it. Halved for rounding.
                let q_min = (-2.0 * entropy)
                    .exp()
                    .min((1.0 - typical_p as f64) / n as f64);
                let threshold = (q_min * 0.5 * total) as f32;
                self.cand.clear();
                self.cand.extend(
                    row.iter()
                        .enumerate()
                        .filter(|&(_, &w)| w > 0.0 && w >= threshold)
                        .map(|(i, _)| i as u32),
                );
            }
            self.keyed.clear();
            for &i in &self.cand {
                let w = row[i as usize] as f64;
                let key = if w > 0.0 {
                    ((log_total - w.ln()) - entropy).abs() as f32
                } else {
                    f32::INFINITY
                };
                self.keyed.push((key, i));
            }
            self.keyed.sort_unstable_by(|a, b| {
                a.0.partial_cmp(&b.0)
                    .unwrap_or(Ordering::Equal)
                    .then(a.1.cmp(&b.1))
            });
            let target = typical_p as f64 * total;
            let mut cum = 0.0f64;
            let mut keep = self.keyed.len();
            for (j, &(_, i)) in self.keyed.iter().enumerate() {
                cum += row[i as usize] as f64;
                if cum >= target {
                    keep = j + 1;
                    break;
                }
            }
            self.cand.clear();
            self.cand
                .extend(self.keyed.iter().take(keep.max(1)).map(|&(_, i)| i));
            cands = Cands::List { sorted: false };
            total = self.cand.iter().map(|&i| row[i as usize] as f64).sum();
        }

        if min_p > 0.0 {
            let w_max = match cands {
                Cands::All => 1.0, // exp(0) at the row's maximum
                Cands::List { .. } => self
                    .cand
                    .iter()
                    .map(|&i| row[i as usize])
                    .fold(0.0f32, f32::max),
            };
            let threshold = min_p * w_max;
            if cands == Cands::All {
                self.cand.clear();
                self.cand.extend(
                    row.iter()
                        .enumerate()
                        .filter(|&(_, &w)| w > 0.0 && w >= threshold)
                        .map(|(i, _)| i as u32),
                );
            } else {
                self.cand.retain(|&i| {
                    let w = row[i as usize];
                    w > 0.0 && w >= threshold
                });
            }
            cands = Cands::List { sorted: false };
            total = self.cand.iter().map(|&i| row[i as usize] as f64).sum();
        }

        if total > 0.0 {
            Some((cands, total))
        } else {
            None
        }
    }

    /// Draws one token from the candidate weights left by `truncate`.
    fn draw_from(&mut self, row: &[f32], cands: Cands, total: f64) -> Option<usize> {
        let n = row.len();
        let u = self.rng.random::<f64>() * total;
        let mut cum = 0.0f64;
        let mut last = None;
        match cands {
            Cands::All => {
                // Find the block first, then the entry within it. If rounding
                // leaves u beyond the last block, the last block is scanned.
                let nblocks = self.block_sums.len();
                let mut b = 0;
                while b + 1 < nblocks && cum + self.block_sums[b] <= u {
                    cum += self.block_sums[b];
                    b += 1;
                }
                let start = b * SUM_BLOCK;
                let end = (start + SUM_BLOCK).min(n);
                for (off, &w) in row[start..end].iter().enumerate() {
                    if w > 0.0 {
                        cum += w as f64;
                        last = Some(start + off);
                        if cum > u {
                            return last;
                        }
                    }
                }
                if last.is_none() {
                    // Only if the chosen block had no weight at all (rounding).
                    last = row.iter().rposition(|&w| w > 0.0);
                }
            }
            Cands::List { .. } => {
                for &i in &self.cand {
                    let w = row[i as usize];
                    if w > 0.0 {
                        cum += w as f64;
                        last = Some(i as usize);
                        if cum > u {
                            return Some(i as usize);
                        }
                    }
                }
            }
        }
        // Rounding left u at or above the final cumulative sum.
        last
    }
}

fn finite_or_zero(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// Orders token ids by descending value in `row`, ties towards the lower id.
fn cmp_desc(row: &[f32], a: u32, b: u32) -> Ordering {
    row[b as usize]
        .partial_cmp(&row[a as usize])
        .unwrap_or(Ordering::Equal)
        .then(a.cmp(&b))
}

fn sort_by_weight(cand: &mut [u32], row: &[f32]) {
    cand.sort_unstable_by(|&a, &b| cmp_desc(row, a, b));
}

const LANES: usize = 8;

/// The row's maximum, and whether every entry is finite or -inf (no NaN, no
/// +inf), in one read-only pass.
#[inline(always)]
fn max_and_check_body(row: &[f32]) -> (f32, bool) {
    let mut acc = [f32::NEG_INFINITY; LANES];
    // NaN compares false: `ok` stays true only for x <= f32::MAX.
    let mut ok = [true; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let x = c[j];
            acc[j] = if x > acc[j] { x } else { acc[j] };
            ok[j] &= x <= f32::MAX;
        }
    }
    let mut m = f32::NEG_INFINITY;
    let mut clean = ok.iter().all(|&b| b);
    for &x in chunks.remainder() {
        m = if x > m { x } else { m };
        clean &= x <= f32::MAX;
    }
    (acc.iter().fold(m, |a, &b| if b > a { b } else { a }), clean)
}

crate::avx512_variant!(fn max_and_check(row: &[f32]) -> (f32, bool) = max_and_check_body);

/// NaN → -inf, +inf → f32::MAX, -0.0 → 0.0, in place; returns the maximum.
fn sanitize_and_max(row: &mut [f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            let x = c[j];
            let x = if x.is_nan() { f32::NEG_INFINITY } else { x };
            let x = if x > f32::MAX { f32::MAX } else { x } + 0.0;
            c[j] = x;
            acc[j] = if x > acc[j] { x } else { acc[j] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for x in chunks.into_remainder() {
        let v = if x.is_nan() { f32::NEG_INFINITY } else { *x };
        let v = if v > f32::MAX { f32::MAX } else { v } + 0.0;
        *x = v;
        m = if v > m { v } else { m };
    }
    acc.iter().fold(m, |a, &b| if b > a { b } else { a })
}

/// Maximum of a sanitised row (no NaN).
fn max_of(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    acc.iter().fold(m, |a, &b| if b > a { b } else { a })
}

/// First index whose value equals `m` (0 if none, e.g. for an empty row).
fn first_index_of(row: &[f32], m: f32) -> usize {
    row.iter().position(|&x| x == m).unwrap_or(0)
}

/// Elements per block whose partial sums stay in f32 before joining the f64
/// total (keeps the summation error around 1e-7 relative).
const SUM_BLOCK: usize = 512;

/// Σ exp((x - max) * inv_t) over the row, in f64. `max` must be the row's
/// maximum (every exponent is <= 0).
#[inline(always)]
fn sum_exp_scaled_body(row: &[f32], max: f32, inv_t: f32) -> f64 {
    let mut total = 0.0f64;
    for block in row.chunks(SUM_BLOCK) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                acc[j] += exp_nonpos((c[j] - max) * inv_t);
            }
        }
        for &x in chunks.remainder() {
            acc[0] += exp_nonpos((x - max) * inv_t);
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

crate::avx512_variant!(fn sum_exp_scaled(row: &[f32], max: f32, inv_t: f32) -> f64 = sum_exp_scaled_body);

/// Replaces every logit x by its weight exp((x - max) * inv_t) and returns
/// the sum of the weights (f64); `block_sums` receives the sum of each
/// `SUM_BLOCK` entries.
#[inline(always)]
fn exp_in_place_body(row: &mut [f32], max: f32, inv_t: f32, block_sums: &mut Vec<f64>) -> f64 {
    block_sums.clear();
    let mut total = 0.0f64;
    for block in row.chunks_mut(SUM_BLOCK) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for j in 0..LANES {
                let w = exp_nonpos((c[j] - max) * inv_t);
                c[j] = w;
                acc[j] += w;
            }
        }
        for x in chunks.into_remainder() {
            let w = exp_nonpos((*x - max) * inv_t);
            *x = w;
            acc[0] += w;
        }
        let block_sum = acc.iter().map(|&a| a as f64).sum::<f64>();
        block_sums.push(block_sum);
        total += block_sum;
    }
    total
}

crate::avx512_variant!(fn exp_in_place(row: &mut [f32], max: f32, inv_t: f32, block_sums: &mut Vec<f64>) -> f64 = exp_in_place_body);

/// exp(x) for x <= 0, with x = -inf (or anything below the smallest normal
/// result) giving exactly 0. Branch-free so that loops over it vectorise;
/// relative error below 3e-7 (a few ulp). NaN input gives 0.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that k * LN2_HI is exact for |k| < 2^9.
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const MIN_X: f32 = -87.0;
    let xc = if x > MIN_X { x } else { MIN_X };
    let kf = xc * LOG2E + MAGIC;
    let k_bits = kf.to_bits() as i32 - MAGIC.to_bits() as i32; // round(xc / ln2)
    let k = kf - MAGIC;
    let r = (xc - k * LN2_HI) - k * LN2_LO; // |r| <= ln2 / 2
                                            // Taylor series of e^r to degree 7 (truncation error < 5e-9 on |r| <= 0.35).
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    // k in [-126, 0]: 2^k is a normal float.
    let scale = f32::from_bits(((k_bits + 127) as u32) << 23);
    let y = p * scale;
    if x >= MIN_X {
        y
    } else {
        0.0
    }
}

/// Calls `visit(index, value)` for the entries of `row` in order, skipping
/// entries `<=` the threshold `visit` last returned (initially -inf: -inf
/// entries are never visited). Whole groups of `LANES` entries are skipped
/// with one vectorisable max when none of them is above the threshold.
fn for_each_above(row: &[f32], mut visit: impl FnMut(usize, f32) -> f32) {
    let mut threshold = f32::NEG_INFINITY;
    let mut chunks = row.chunks_exact(LANES);
    let mut base = 0;
    for c in &mut chunks {
        let m = c
            .iter()
            .fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
        if m > threshold {
            for (j, &x) in c.iter().enumerate() {
                if x > threshold {
                    threshold = visit(base + j, x);
                }
            }
        }
        base += LANES;
    }
    for (j, &x) in chunks.remainder().iter().enumerate() {
        if x > threshold {
            threshold = visit(base + j, x);
        }
    }
}

/// The `k` best (id, value) pairs of a sanitised row, best first, ties
/// towards the lower id.
fn top_n_raw(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    let mut worst = f32::NEG_INFINITY;
    for_each_above(row, |i, x| {
        // When full, a value equal to the worst kept one loses the tie (its
        // id is higher), so only strictly greater values get in.
        if best.len() == k && x <= worst {
            return worst;
        }
        let pos = best.partition_point(|&(_, v)| v >= x);
        best.insert(pos, (i as u32, x));
        best.truncate(k);
        if best.len() == k {
            worst = best[k - 1].1;
        }
        if best.len() == k {
            worst
        } else {
            f32::NEG_INFINITY
        }
    });
    best
}

/// Fills `out` with the ids of the `k` largest finite values of `row`,
/// sorted best first (ties towards the lower id). Uses a buffer of at most
/// 2k ids: whenever it fills, it is cut back to the best k with
/// `select_nth_unstable_by`, and values not above the k-th best seen so far
/// are skipped without being stored.
fn top_k_select(row: &[f32], k: usize, out: &mut Vec<u32>) {
    out.clear();
    if k == 0 {
        return;
    }
    let cap = k.saturating_mul(2).max(k + 1);
    let mut threshold = f32::NEG_INFINITY; // values <= threshold are skipped
    for_each_above(row, |i, x| {
        if x <= threshold {
            return threshold;
        }
        out.push(i as u32);
        if out.len() >= cap {
            out.select_nth_unstable_by(k - 1, |&a, &b| cmp_desc(row, a, b));
            out.truncate(k);
            threshold = row[out[k - 1] as usize];
        }
        threshold
    });
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, |&a, &b| cmp_desc(row, a, b));
        out.truncate(k);
    }
    sort_by_weight(out, row);
}

/// `logit_bias` as the sampler applies it: sorted by id, one entry per id
/// (the last one given), finite non-zero biases only.
fn normalized_bias(given: &[(u32, f32)]) -> Vec<(u32, f32)> {
    let mut sorted = given.to_vec();
    // Stable, so that within one id the entries keep the order given.
    sorted.sort_by_key(|&(t, _)| t);
    let mut bias: Vec<(u32, f32)> = Vec::with_capacity(sorted.len());
    for (tok, b) in sorted {
        match bias.last_mut() {
            Some(last) if last.0 == tok => last.1 = b,
            _ => bias.push((tok, b)),
        }
    }
    bias.retain(|&(_, b)| b.is_finite() && b != 0.0);
    bias
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> SamplingParams {
        SamplingParams::default()
    }

    fn sampling(seed: u64) -> SamplingParams {
        SamplingParams {
            do_sample: true,
            temperature: 1.0,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
        row.iter().map(|&x| x as f64 - m - s.ln()).collect()
    }

    /// Empirical counts of `draws` samples (fresh copy of `row` each time).
    fn histogram(params: SamplingParams, row: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(params, &[]);
        let mut counts = vec![0usize; row.len()];
        let mut buf = row.to_vec();
        for _ in 0..draws {
            buf.copy_from_slice(row);
            let t = s.choose(&mut buf, None); // no recording: penalties are off anyway
            counts[t.id as usize] += 1;
        }
        counts
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert!(p.is_greedy());
        p.validate().unwrap();
        assert!(!sampling(1).is_greedy());
        let zero_t = SamplingParams {
            temperature: 0.0,
            ..sampling(1)
        };
        assert!(zero_t.is_greedy());
    }

    #[test]
    fn validate_names_parameter_and_range() {
        let cases: Vec<(SamplingParams, &str)> = vec![
            (
                SamplingParams {
                    temperature: -0.1,
                    ..greedy()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..greedy()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..greedy()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..greedy()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..greedy()
                },
                "top_p",
            ),
            (
                SamplingParams {
                    typical_p: 0.0,
                    ..greedy()
                },
                "typical_p",
            ),
            (
                SamplingParams {
                    min_p: -0.1,
                    ..greedy()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    min_p: 1.1,
                    ..greedy()
                },
                "min_p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..greedy()
                },
                "repetition_penalty",
            ),
            (
                SamplingParams {
                    frequency_penalty: 2.5,
                    ..greedy()
                },
                "frequency_penalty",
            ),
            (
                SamplingParams {
                    presence_penalty: -2.5,
                    ..greedy()
                },
                "presence_penalty",
            ),
            (
                SamplingParams {
                    top_n_tokens: 21,
                    ..greedy()
                },
                "top_n_tokens",
            ),
        ];
        for (p, name) in cases {
            match p.validate() {
                Err(SamplingError::OutOfRange {
                    name: n, allowed, ..
                }) => {
                    assert_eq!(n, name);
                    assert!(!allowed.is_empty());
                    let msg = p.validate().unwrap_err().to_string();
                    assert!(msg.contains(name) && msg.contains(allowed), "{msg}");
                }
                Ok(()) => panic!("{name} accepted out of range: {p:?}"),
            }
        }
        let edge = SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            typical_p: 1.0,
            min_p: 1.0,
            frequency_penalty: -2.0,
            presence_penalty: 2.0,
            top_n_tokens: 20,
            ..greedy()
        };
        edge.validate().unwrap();
    }

    #[test]
    fn exp_approximation_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let got = exp_nonpos(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0013;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(-200.0), 0.0);
        assert_eq!(exp_nonpos(f32::NAN), 0.0);
    }

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(greedy(), &[]);
        let mut row = vec![0.5, 3.0, -1.0, 2.9, 3.0];
        assert_eq!(s.sample(&mut row).id, 1);
        let mut row = vec![-5.0, -2.0, -3.0];
        assert_eq!(s.sample(&mut row).id, 1);
    }

    #[test]
    fn logprob_matches_hand_computed_log_softmax() {
        // log-softmax of [1, 2, 3, 0]: Z = e + e^2 + e^3 + 1.
        let row = [1.0f32, 2.0, 3.0, 0.0];
        let z = (1.0f64).exp() + (2.0f64).exp() + (3.0f64).exp() + 1.0;
        let want = 3.0 - z.ln(); // ≈ -0.4401897
        let mut s = Sampler::new(
            SamplingParams {
                top_n_tokens: 4,
                ..greedy()
            },
            &[],
        );
        let t = s.sample(&mut row.to_vec());
        assert_eq!(t.id, 2);
        assert!(
            (t.logprob as f64 - want).abs() < 1e-6,
            "{} vs {want}",
            t.logprob
        );
        assert!((want - -0.440_189_7).abs() < 1e-6);
        // All alternatives, best first, each an exact log-softmax value.
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![2, 1, 0, 3]);
        let exact = log_softmax(&row);
        for &(i, lp) in &t.top {
            assert!((lp as f64 - exact[i as usize]).abs() < 1e-6);
        }
        let total: f64 = t.top.iter().map(|&(_, lp)| (lp as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn logprobs_accurate_on_large_vocab() {
        // Large vocabulary, large logits: needs the max trick and careful sums.
        let n = 128_000;
        let row: Vec<f32> = (0..n)
            .map(|i| 40.0 + ((i * 7919) % 1000) as f32 * 0.013 - (i % 3) as f32 * 5.0)
            .collect();
        let exact = log_softmax(&row);
        let mut s = Sampler::new(
            SamplingParams {
                top_n_tokens: 5,
                ..greedy()
            },
            &[],
        );
        let t = s.sample(&mut row.clone());
        assert!((t.logprob as f64 - exact[t.id as usize]).abs() < 2e-5);
        for &(i, lp) in &t.top {
            assert!((lp as f64 - exact[i as usize]).abs() < 2e-5);
        }
        // Sampled tokens (whose row was overwritten by weights) too, with
        // and without truncation and penalties.
        for params in [
            SamplingParams {
                temperature: 0.7,
                ..sampling(1)
            },
            SamplingParams {
                temperature: 1.3,
                top_p: 0.9,
                ..sampling(2)
            },
            SamplingParams {
                temperature: 0.5,
                top_k: 40,
                ..sampling(3)
            },
            SamplingParams {
                repetition_penalty: 1.3,
                frequency_penalty: 0.7,
                ..sampling(4)
            },
        ] {
            let mut s = Sampler::new(params, &[1, 2, 3, 4, 5]);
            for _ in 0..8 {
                let t = s.sample(&mut row.clone());
                let err = (t.logprob as f64 - exact[t.id as usize]).abs();
                assert!(err < 2e-5, "{err}");
            }
        }
    }

    #[test]
    fn logprobs_are_of_raw_logits_not_penalised_or_tempered() {
        let row = [4.0f32, 3.9, 1.0, 0.0];
        let exact = log_softmax(&row);
        let params = SamplingParams {
            repetition_penalty: 2.0,
            top_n_tokens: 2,
            ..greedy()
        };
        // Token 0 was in the prompt: 4.0 / 2 = 2.0 < 3.9, so token 1 wins.
        let mut s = Sampler::new(params, &[0]);
        let t = s.sample(&mut row.to_vec());
        assert_eq!(t.id, 1);
        assert!((t.logprob as f64 - exact[1]).abs() < 1e-6);
        assert_eq!(t.top[0].0, 0);
        assert!((t.top[0].1 as f64 - exact[0]).abs() < 1e-6);

        // Temperature does not change the reported logprob either.
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 0.3,
                top_k: 1,
                ..sampling(3)
            },
            &[],
        );
        let t = s.sample(&mut row.to_vec());
        assert_eq!(t.id, 0);
        assert!((t.logprob as f64 - exact[0]).abs() < 1e-6);
    }

    #[test]
    fn top_n_ordering_and_ties() {
        let row = [1.0f32, 5.0, 3.0, 5.0, 4.0, -1.0];
        let mut s = Sampler::new(
            SamplingParams {
                top_n_tokens: 3,
                ..greedy()
            },
            &[],
        );
        let t = s.sample(&mut row.to_vec());
        let ids: Vec<u32> = t.top.iter().map(|&(i, _)| i).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        assert!(t.top[0].1 == t.top[1].1 && t.top[1].1 > t.top[2].1);
        // top_n larger than the vocabulary is capped.
        let mut s = Sampler::new(
            SamplingParams {
                top_n_tokens: 20,
                ..greedy()
            },
            &[],
        );
        assert_eq!(s.sample(&mut row.to_vec()).top.len(), row.len());
    }

    #[test]
    fn repetition_penalty_hf_semantics() {
        // Positive logits divided, negative multiplied.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..greedy()
            },
            &[0, 2],
        );
        let mut row = vec![3.0f32, 2.0, -1.0, -1.5];
        s.apply_penalties(&mut row);
        assert_eq!(row, vec![1.5, 2.0, -2.0, -1.5]);
        // And it changes the argmax: 3.0 -> 1.5 < 2.0.
        let mut row = vec![3.0f32, 2.0, -1.0, -1.5];
        assert_eq!(s.sample(&mut row).id, 1);
        // Generated tokens are penalised too: token 1 was just generated.
        let mut row = vec![0.0f32, 2.0, -1.0, 1.2];
        assert_eq!(s.sample(&mut row).id, 3); // 2.0 / 2 = 1.0 < 1.2
    }

    #[test]
    fn frequency_and_presence_penalties_openai_semantics() {
        let params = SamplingParams {
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..greedy()
        };
        // Prompt tokens are not penalised by frequency/presence.
        let mut s = Sampler::new(params, &[0, 0, 0]);
        s.record_generated(1);
        s.record_generated(1);
        s.record_generated(2);
        let mut row = vec![1.0f32, 3.0, 2.0, 1.9];
        s.apply_penalties(&mut row);
        // token 1: 3 - 0.5*2 - 0.25 = 1.75; token 2: 2 - 0.5 - 0.25 = 1.25.
        assert_eq!(row, vec![1.0, 1.75, 1.25, 1.9]);
        let mut row = vec![1.0f32, 3.0, 2.0, 1.9];
        assert_eq!(s.sample(&mut row).id, 3);
        // sample() recorded token 3 itself: now 1.9 - 0.75 = 1.15 < 1.75.
        let mut row = vec![1.0f32, 3.0, 2.0, 1.9];
        assert_eq!(s.sample(&mut row).id, 1);
        assert_eq!(s.generated_len(), 5);
    }

    #[test]
    fn negative_penalties_encourage() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: -2.0,
                ..greedy()
            },
            &[],
        );
        s.record_generated(2);
        let mut row = vec![1.0f32, 0.5, -0.5];
        assert_eq!(s.sample(&mut row).id, 2); // -0.5 + 2 = 1.5
    }

    #[test]
    fn penalties_ignore_out_of_vocab_ids() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                ..greedy()
            },
            &[1_000_000, 1],
        );
        let mut row = vec![1.0f32, 1.2];
        assert_eq!(s.sample(&mut row).id, 0);
    }

    #[test]
    fn logit_bias_steers_greedy_and_sampled_choices() {
        let row = vec![3.0f32, 1.0, 0.5, 2.0];
        // -100 bans the argmax; greedy takes the next best.
        let mut s = Sampler::new(
            SamplingParams {
                logit_bias: vec![(0, -100.0)],
                ..greedy()
            },
            &[],
        );
        let tok = s.sample(&mut row.clone());
        assert_eq!(tok.id, 3);
        // The reported log-probability is the model's, before the bias.
        let want = log_softmax(&row)[3] as f32;
        assert!(
            (tok.logprob - want).abs() < 1e-6,
            "{} vs {want}",
            tok.logprob
        );
        // +100 makes one token the only choice, even when sampling hot.
        for seed in 0..20 {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 2.0,
                    logit_bias: vec![(2, 100.0)],
                    ..sampling(seed)
                },
                &[],
            );
            assert_eq!(s.sample(&mut row.clone()).id, 2);
        }
        // Banning every token but one leaves that one.
        let counts = histogram(
            SamplingParams {
                logit_bias: vec![(0, -100.0), (1, -100.0), (3, -100.0)],
                ..sampling(5)
            },
            &row,
            200,
        );
        assert_eq!(counts, vec![0, 0, 200, 0]);
    }

    #[test]
    fn logit_bias_adds_to_penalised_logits_and_keeps_raw_logprobs() {
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 1.0,
                logit_bias: vec![(1, 0.75), (7, 5.0), (1, 0.5)],
                ..greedy()
            },
            &[],
        );
        s.record_generated(1);
        let raw = vec![1.0f32, 1.4, 0.2];
        let mut row = raw.clone();
        let tok = s.choose(&mut row, None);
        // Token 1: 1.4 - 1.0 (presence) + 0.5 (the last bias given) = 0.9 < 1.0.
        assert_eq!(tok.id, 0);
        assert_eq!(row, vec![1.0, 1.4 - 1.0 + 0.5, 0.2]);
        // Token 1 is saved once, with its raw logit.
        assert_eq!(s.saved, vec![(1, 1.4)]);
        // Id 7 is past the vocabulary and ignored.
        assert_eq!(s.bias, vec![(1, 0.5), (7, 5.0)]);
    }

    /// JSON mode: sampling hot from random logits over a small vocabulary still
    /// writes one JSON object and then the end of sequence, whatever the seed.
    #[test]
    fn json_mode_samples_only_json_objects() {
        use crate::json_mode::{JsonConstraint, TokenBytes};
        use std::sync::Arc;
        let pieces = [
            "{", "}", "[", "]", "\"", ":", ",", " ", "a", "bc", "1", "2.5", "-", "true", "null",
            "\":", "\"}", "]}", "{\"", "x\\n", "e3",
        ];
        let eos = pieces.len() as u32;
        let vocab = Arc::new(TokenBytes::from_pieces(
            pieces
                .iter()
                .map(|p| Some(p.as_bytes().to_vec()))
                .chain([None])
                .collect(),
        ));
        let mut complete = 0;
        for seed in 0..30u64 {
            let mut s = Sampler::new(
                SamplingParams {
                    temperature: 1.5,
                    json_object: true,
                    ..sampling(seed)
                },
                &[],
            );
            s.constrain(JsonConstraint::new(vocab.clone(), vec![eos]));
            let mut noise = ChaCha8Rng::seed_from_u64(1000 + seed);
            let mut text = Vec::new();
            let mut ended = false;
            for _ in 0..400 {
                let mut row: Vec<f32> = (0..=eos).map(|_| noise.random_range(-3.0..3.0)).collect();
                let tok = s.sample(&mut row);
                if tok.id == eos {
                    ended = true;
                    break;
                }
                text.extend_from_slice(pieces[tok.id as usize].as_bytes());
            }
            let text = String::from_utf8(text).unwrap();
            if ended {
                let value: serde_json::Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("seed {seed}: {text:?}: {e}"));
                assert!(value.is_object(), "seed {seed}: {text}");
                complete += 1;
            } else {
                // Cut by the step limit: still a prefix of a JSON object.
                let mut m = crate::json_mode::JsonMachine::new();
                assert!(m.feed(text.as_bytes()), "seed {seed}: {text}");
            }
        }
        assert!(complete >= 10, "only {complete} of 30 objects closed");
    }

    #[test]
    fn logit_bias_out_of_range_is_rejected() {
        let p = SamplingParams {
            logit_bias: vec![(3, 100.5)],
            ..greedy()
        };
        let err = p.validate().unwrap_err().to_string();
        assert!(
            err.contains("logit_bias") && err.contains("token 3"),
            "{err}"
        );
        let nan = SamplingParams {
            logit_bias: vec![(3, f32::NAN)],
            ..greedy()
        };
        assert!(nan.validate().is_err());
        let ok = SamplingParams {
            logit_bias: vec![(3, -100.0), (4, 100.0)],
            ..greedy()
        };
        ok.validate().unwrap();
    }

    #[test]
    fn top_k_one_equals_greedy() {
        let row: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 * 0.1).collect();
        let want = {
            let mut g = Sampler::new(greedy(), &[]);
            g.sample(&mut row.clone()).id
        };
        for seed in 0..20 {
            let mut s = Sampler::new(
                SamplingParams {
                    top_k: 1,
                    temperature: 1.5,
                    ..sampling(seed)
                },
                &[],
            );
            assert_eq!(s.sample(&mut row.clone()).id, want);
        }
    }

    #[test]
    fn top_k_selection_matches_full_sort() {
        let row: Vec<f32> = (0..5000)
            .map(|i| (((i * 7919) % 613) as f32).sin() * 10.0)
            .collect();
        for k in [1usize, 2, 7, 50, 613, 2500, 4999] {
            let mut out = Vec::new();
            top_k_select(&row, k, &mut out);
            let mut all: Vec<u32> = (0..row.len() as u32).collect();
            sort_by_weight(&mut all, &row);
            assert_eq!(out, all[..k].to_vec(), "k = {k}");
        }
    }

    #[test]
    fn top_k_never_draws_outside_the_k_best() {
        let row = [0.0f32, 1.0, 2.0, 3.0, 2.5, -1.0];
        let counts = histogram(
            SamplingParams {
                top_k: 3,
                temperature: 2.0,
                ..sampling(11)
            },
            &row,
            6000,
        );
        for (i, &c) in counts.iter().enumerate() {
            if [2, 3, 4].contains(&i) {
                assert!(c > 0, "token {i} never drawn");
            } else {
                assert_eq!(c, 0, "token {i} outside top-3 drawn");
            }
        }
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        // probs ∝ [0.5, 0.25, 0.15, 0.07, 0.03]: p = 0.8 keeps {0, 1, 2}
        // (0.75 < 0.8 <= 0.9).
        let probs = [0.5f64, 0.25, 0.15, 0.07, 0.03];
        let row: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let counts = histogram(
            SamplingParams {
                top_p: 0.8,
                ..sampling(5)
            },
            &row,
            20_000,
        );
        assert_eq!(counts[3], 0);
        assert_eq!(counts[4], 0);
        // Renormalised: 0.5/0.9, 0.25/0.9, 0.15/0.9.
        for (i, p) in [(0, 0.5 / 0.9), (1, 0.25 / 0.9), (2, 0.15 / 0.9)] {
            let f = counts[i] as f64 / 20_000.0;
            assert!((f - p).abs() < 0.015, "token {i}: {f} vs {p}");
        }
        // p exactly reached by a prefix: 0.75 keeps {0, 1} only.
        let counts = histogram(
            SamplingParams {
                top_p: 0.75,
                ..sampling(6)
            },
            &row,
            5000,
        );
        assert!(counts[0] > 0 && counts[1] > 0);
        assert_eq!(counts[2] + counts[3] + counts[4], 0);
    }

    #[test]
    fn top_p_on_large_flat_tail() {
        // One dominant token plus a long flat tail: the pre-filter must not
        // drop tail tokens that belong to the nucleus.
        let n = 2000usize;
        let mut row = vec![0.0f32; n];
        row[123] = (n as f32).ln(); // weight n vs tail total n-1: p(123) ≈ 0.5
        let draws = 1000;
        let counts = histogram(
            SamplingParams {
                top_p: 0.9,
                ..sampling(8)
            },
            &row,
            draws,
        );
        let head = counts[123] as f64 / draws as f64;
        // Nucleus: token 123 (≈0.5) plus 0.4 of the mass from the tail,
        // i.e. the 0.8 n lowest-id tail tokens (ties go to the lower id);
        // renormalised, the head has 0.5 / 0.9.
        assert!((head - 0.5 / 0.9).abs() < 0.04, "{head}");
        let tail_drawn = counts
            .iter()
            .enumerate()
            .filter(|&(i, &c)| i != 123 && c > 0)
            .count();
        assert!(tail_drawn > 300, "{tail_drawn}");
        let last_drawn = counts.iter().rposition(|&c| c > 0).unwrap();
        let boundary = (0.8 * n as f64) as usize; // last id in the nucleus
        assert!(last_drawn <= boundary + 5, "{last_drawn}");
        assert!(last_drawn > boundary - boundary / 20, "{last_drawn}");
    }

    #[test]
    fn min_p_drops_unlikely_tokens() {
        // probs ∝ [0.4, 0.3, 0.2, 0.06, 0.04]; min_p 0.2 → threshold 0.08.
        let row: Vec<f32> = [0.4f64, 0.3, 0.2, 0.06, 0.04]
            .iter()
            .map(|p| p.ln() as f32)
            .collect();
        let counts = histogram(
            SamplingParams {
                min_p: 0.2,
                ..sampling(9)
            },
            &row,
            9000,
        );
        assert_eq!(counts[3] + counts[4], 0);
        for (i, p) in [(0, 0.4 / 0.9), (1, 0.3 / 0.9), (2, 0.2 / 0.9)] {
            let f = counts[i] as f64 / 9000.0;
            assert!((f - p).abs() < 0.02, "token {i}: {f} vs {p}");
        }
    }

    #[test]
    fn typical_p_keeps_tokens_near_the_entropy() {
        // probs [0.4, 0.2, 0.2, 0.1, 0.1]: H = 1.4708 nats; -ln p =
        // [0.916, 1.609, 1.609, 2.303, 2.303] → deviations [0.555, 0.139,
        // 0.139, 0.832, 0.832]. Typical order: 1, 2, 0, 3, 4.
        // typical_p 0.5: 0.2 + 0.2 = 0.4 < 0.5 <= 0.8 → keep {1, 2, 0}.
        let probs = [0.4f64, 0.2, 0.2, 0.1, 0.1];
        let row: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let counts = histogram(
            SamplingParams {
                typical_p: 0.5,
                ..sampling(10)
            },
            &row,
            8000,
        );
        assert_eq!(counts[3] + counts[4], 0);
        for (i, p) in [(0, 0.5), (1, 0.25), (2, 0.25)] {
            let f = counts[i] as f64 / 8000.0;
            assert!((f - p).abs() < 0.02, "token {i}: {f} vs {p}");
        }
        // typical_p 0.3: keeps only {1, 2}, dropping the most likely token.
        let counts = histogram(
            SamplingParams {
                typical_p: 0.3,
                ..sampling(10)
            },
            &row,
            4000,
        );
        assert_eq!(counts[0] + counts[3] + counts[4], 0);
        assert!(counts[1] > 1700 && counts[2] > 1700);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let probs = [0.6f64, 0.3, 0.1];
        let row: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let draws = 30_000;
        for t in [1.0f64, 0.5, 2.0] {
            let counts = histogram(
                SamplingParams {
                    temperature: t as f32,
                    ..sampling(12)
                },
                &row,
                draws,
            );
            let w: Vec<f64> = probs.iter().map(|p| p.powf(1.0 / t)).collect();
            let z: f64 = w.iter().sum();
            for i in 0..3 {
                let f = counts[i] as f64 / draws as f64;
                let want = w[i] / z;
                assert!((f - want).abs() < 0.012, "T={t} token {i}: {f} vs {want}");
            }
        }
        // Very low temperature is (almost surely) argmax.
        let counts = histogram(
            SamplingParams {
                temperature: 1e-4,
                ..sampling(12)
            },
            &row,
            1000,
        );
        assert_eq!(counts[0], 1000);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let row: Vec<f32> = (0..512).map(|i| ((i * 31) % 17) as f32 * 0.05).collect();
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(
                SamplingParams {
                    top_p: 0.95,
                    top_k: 300,
                    ..sampling(seed)
                },
                &[],
            );
            (0..64).map(|_| s.sample(&mut row.clone()).id).collect()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let s = Sampler::new(sampling(77), &[]);
        assert_eq!(s.seed(), 77);
        // Without a seed one is picked (and reported).
        let a = Sampler::new(
            SamplingParams {
                seed: None,
                ..sampling(0)
            },
            &[],
        );
        let b = Sampler::new(
            SamplingParams {
                seed: None,
                ..sampling(0)
            },
            &[],
        );
        assert_ne!(a.seed(), b.seed());
    }

    #[test]
    fn nan_and_inf_do_not_panic() {
        for params in [
            greedy(),
            sampling(1),
            SamplingParams {
                top_k: 2,
                top_p: 0.5,
                typical_p: 0.9,
                min_p: 0.1,
                ..sampling(1)
            },
            SamplingParams {
                repetition_penalty: 1.3,
                frequency_penalty: 1.0,
                ..sampling(2)
            },
        ] {
            let mut s = Sampler::new(params.clone(), &[0, 1, 2]);
            // NaN treated as -inf.
            let t = s.sample(&mut [f32::NAN, 1.0, f32::NAN, 0.5]);
            assert!(t.id == 1 || t.id == 3, "{params:?}: {t:?}");
            assert!(t.logprob.is_finite());
            // +inf wins outright.
            let t = s.sample(&mut [0.0, f32::INFINITY, 3.0]);
            assert_eq!(t.id, 1);
            assert!(t.logprob.is_finite());
            // Everything -inf / NaN: falls back to token 0.
            let t = s.sample(&mut [f32::NAN, f32::NEG_INFINITY, f32::NAN]);
            assert_eq!(t.id, 0);
            assert!(!t.logprob.is_nan());
            // Empty row.
            assert_eq!(s.sample(&mut []).id, 0);
        }
        // A huge temperature or a tiny one stays finite.
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1e30,
                ..sampling(3)
            },
            &[],
        );
        assert!(s.sample(&mut [1.0, 2.0]).id < 2);
        let mut s = Sampler::new(
            SamplingParams {
                temperature: 1e-40,
                ..sampling(3)
            },
            &[],
        );
        assert_eq!(s.sample(&mut [1.0, 2.0]).id, 1);
    }

    /// Deterministic pseudo-random logits with distinct values.
    fn random_row(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Sum of uniforms ≈ normal.
                let u = ((x >> 40) as f32 / (1u64 << 24) as f32)
                    + ((x >> 16 & 0xff_ffff) as f32 / (1u64 << 24) as f32)
                    - 1.0;
                u * scale
            })
            .collect()
    }

    /// Straightforward full-sort reference of the kept set (f64 throughout).
    fn reference_kept(row: &[f32], p: &SamplingParams) -> Vec<u32> {
        let t = p.temperature as f64;
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let mut toks: Vec<(u32, f64)> = row
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x as f64 - m) / t).exp()))
            .collect();
        let by_prob =
            |a: &(u32, f64), b: &(u32, f64)| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0));
        toks.sort_by(by_prob);
        if p.top_k > 0 {
            toks.truncate(p.top_k as usize);
        }
        let prefix = |toks: &[(u32, f64)], mass: f64| -> usize {
            let total: f64 = toks.iter().map(|t| t.1).sum();
            let mut cum = 0.0;
            for (j, t) in toks.iter().enumerate() {
                cum += t.1;
                if cum >= mass * total {
                    return j + 1;
                }
            }
            toks.len()
        };
        if p.top_p < 1.0 {
            let keep = prefix(&toks, p.top_p as f64);
            toks.truncate(keep);
        }
        if p.typical_p < 1.0 {
            let total: f64 = toks.iter().map(|t| t.1).sum();
            let h: f64 = -toks
                .iter()
                .map(|t| (t.1 / total) * (t.1 / total).ln())
                .sum::<f64>();
            let mut keyed: Vec<(f64, u32, f64)> = toks
                .iter()
                .map(|&(i, w)| ((-(w / total).ln() - h).abs(), i, w))
                .collect();
            keyed.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
            let as_toks: Vec<(u32, f64)> = keyed.iter().map(|k| (k.1, k.2)).collect();
            let keep = prefix(&as_toks, p.typical_p as f64);
            toks = as_toks[..keep].to_vec();
        }
        if p.min_p > 0.0 {
            let wmax = toks.iter().fold(0.0f64, |a, t| a.max(t.1));
            toks.retain(|t| t.1 >= p.min_p as f64 * wmax);
        }
        let mut ids: Vec<u32> = toks
            .into_iter()
            .filter(|t| t.1 > 0.0)
            .map(|t| t.0)
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn truncation_matches_full_sort_reference() {
        let mut combos = Vec::new();
        for &top_k in &[0u32, 1, 40, 700] {
            for &top_p in &[1.0f32, 0.95, 0.6] {
                for &typical_p in &[1.0f32, 0.9, 0.4] {
                    for &min_p in &[0.0f32, 0.05] {
                        combos.push(SamplingParams {
                            top_k,
                            top_p,
                            typical_p,
                            min_p,
                            temperature: 0.8,
                            ..sampling(0)
                        });
                    }
                }
            }
        }
        let mut checked = 0;
        for (r, scale) in [(1u64, 4.0f32), (2, 12.0), (3, 1.0)] {
            let row = random_row(3000, r, scale);
            for p in &combos {
                let want = reference_kept(&row, p);
                let mut s = Sampler::new(p.clone(), &[]);
                let mut buf = row.clone();
                let max = max_and_check(&buf).0;
                let inv_t = 1.0 / p.temperature;
                let (cands, _) = s.truncate(&mut buf, max, inv_t).unwrap();
                let mut got: Vec<u32> = match cands {
                    Cands::All => (0..buf.len() as u32)
                        .filter(|&i| buf[i as usize] > 0.0)
                        .collect(),
                    Cands::List { .. } => s.cand.clone(),
                };
                got.sort_unstable();
                assert_eq!(got, want, "scale {scale}, {p:?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 3 * 72);
    }

    #[test]
    fn whole_row_draw_across_blocks() {
        // Mass on a few tokens in different SUM_BLOCK blocks (and at block
        // edges); everything else is negligible.
        let n = 2600;
        let mut row = vec![-40.0f32; n];
        let hot = [
            (3usize, 0.1f64),
            (511, 0.2),
            (512, 0.3),
            (2047, 0.15),
            (2599, 0.25),
        ];
        for &(i, p) in &hot {
            row[i] = p.ln() as f32;
        }
        let draws = 5000;
        let counts = histogram(sampling(21), &row, draws);
        let mut seen = 0;
        for &(i, p) in &hot {
            let f = counts[i] as f64 / draws as f64;
            assert!((f - p).abs() < 0.022, "token {i}: {f} vs {p}");
            seen += counts[i];
        }
        assert_eq!(seen, draws);
    }

    #[test]
    fn given_logsumexp_gives_same_results() {
        let row = random_row(4096, 9, 6.0);
        let exact = log_softmax(&row);
        let m = row.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
        let lse = (m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()) as f32;
        for params in [
            greedy(),
            SamplingParams {
                top_p: 0.9,
                top_n_tokens: 3,
                ..sampling(4)
            },
        ] {
            let mut a = Sampler::new(params.clone(), &[]);
            let mut b = Sampler::new(params, &[]);
            for _ in 0..10 {
                let ta = a.sample(&mut row.clone());
                let tb = b.sample_with_logsumexp(&mut row.clone(), lse);
                assert_eq!(ta.id, tb.id);
                assert!((tb.logprob as f64 - exact[tb.id as usize]).abs() < 1e-5);
                for (x, y) in ta.top.iter().zip(&tb.top) {
                    assert_eq!(x.0, y.0);
                    assert!((x.1 - y.1).abs() < 1e-5);
                }
            }
        }
        // A NaN log-sum-exp (from a NaN row) is ignored.
        let mut s = Sampler::new(greedy(), &[]);
        let t = s.sample_with_logsumexp(&mut [f32::NAN, 0.0, 0.0], f32::NAN);
        assert_eq!(t.id, 1);
        assert!((t.logprob - -(2.0f32).ln()).abs() < 1e-6);
    }
}
