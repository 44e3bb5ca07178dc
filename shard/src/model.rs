//! The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) on libtorch.
//! The model is immutable; the paged KV cache is passed in for every step.

use tch::{Device, Kind, Tensor};
use tessera_model::config::ModelConfig;

use crate::attention::{self, AttentionPlan};
use crate::collectives::{CollectiveTime, Communicator};
use crate::cpu_rotary::RotaryTable;
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{Int4Codes, Linear};
use crate::partition::Partition;
use crate::stage_timing::mark;
use crate::weights::{Slice, WeightSource};

struct Layer {
    attn_norm: Tensor,
    /// q, k and v projections concatenated: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    qkv: Linear,
    qkv_bias: Option<Tensor>,
    o_proj: Linear,
    mlp_norm: Tensor,
    /// gate and up projections concatenated: `[2 * intermediate, hidden]`.
    gate_up: Linear,
    down: Linear,
}

pub struct Llama {
    config: ModelConfig,
    /// This rank's heads, MLP columns and vocabulary (everything with one rank).
    part: Partition,
    /// Collectives with the other ranks (none with one rank).
    comm: Communicator,
    kind: Kind,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Tensor,
    /// The same inverse frequencies on the host, for `cpu_rotary`.
    inv_freq_host: Vec<f32>,
}

/// One forward step over a flattened batch of `T` new tokens from `B` sequences.
/// How a step applies the rotary embedding: in place on the CPU, else with operators
/// on the step's cos and sin (`[T, 1, head_dim]`).
enum Rotary {
    InPlace(RotaryTable),
    Operators(Tensor, Tensor),
}

pub struct StepInput {
    /// `[T]` token ids.
    pub tokens: Tensor,
    /// `[T]` absolute positions.
    pub positions: Tensor,
    /// `[T]` KV pool slots the new keys and values are written to.
    pub slots: Tensor,
    /// The same slots on the host.
    pub slots_host: Vec<i64>,
    /// `[B]` index into `T` of each sequence's last token (its logits are returned).
    pub last_index: Tensor,
    pub attention: AttentionPlan,
}

impl Llama {
    /// Loads this rank's part of the model (`part`; everything with one rank).
    pub fn load(
        source: &WeightSource,
        config: ModelConfig,
        part: Partition,
        comm: Communicator,
        kind: Kind,
        device: Device,
        small_batch_copies: bool,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let load = |name: &str, shape: &[usize]| source.load(c, name, shape, kind, device);
        let load_part = |name: &str, shape: &[usize], slice: Slice| {
            source.load_slice(c, name, shape, slice, kind, device)
        };
        let rows = |r: &std::ops::Range<usize>, scale: usize| Slice::Rows {
            start: r.start * scale,
            len: r.len() * scale,
        };
        let cols = |r: &std::ops::Range<usize>, scale: usize| Slice::Cols {
            start: r.start * scale,
            len: r.len() * scale,
        };
        // Compressed copies for small CPU batches, in reduced precision only (f32 stays
        // exact for reference checks), unless f32 weights are asked to keep such copies
        // for small batches (`EngineConfig::small_batch_copies`); libtorch's kernels
        // then compute in bf16.
        let reduced = matches!(kind, Kind::BFloat16 | Kind::Half);
        let compress = device == Device::Cpu && (reduced || small_batch_copies);
        let compute = if reduced { kind } else { Kind::BFloat16 };
        let linear = |dense: Tensor, parts: &[(String, [usize; 2], Slice)]| -> Result<Linear> {
            let linear = Linear::dense(dense).with_packed(false);
            if !compress {
                return Ok(linear);
            }
            let mut codes = Vec::with_capacity(parts.len());
            for (name, shape, slice) in parts {
                let Some(code) = source.int4_codes(c, name, shape)? else {
                    return Ok(linear);
                };
                let code = match *slice {
                    Slice::Full => Some(code),
                    Slice::Rows { start, len } => code.select_rows(start, len),
                    Slice::Cols { start, len } => code.select_cols(start, len),
                };
                match code {
                    Some(code) => codes.push(code),
                    None => return Ok(linear),
                }
            }
            match Int4Codes::concat(codes) {
                Some(codes) => linear.with_int4(codes, compute),
                None => Ok(linear),
            }
        };
        let vocab_rows = rows(&part.vocab, 1);
        let embed = load_part("model.embed_tokens.weight", &[c.vocab_size, h], vocab_rows)?;
        let (q_rows, kv_rows) = (rows(&part.heads, hd), rows(&part.kv_heads, hd));
        let (nq, nkv) = (c.num_heads * hd, c.num_kv_heads * hd);
        let inter = c.intermediate_size;
        let inter_rows = rows(&part.intermediate, 1);
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let names = |suffix: &str| format!("{p}.{suffix}");
            let (qn, kn, vn) = (
                names("self_attn.q_proj.weight"),
                names("self_attn.k_proj.weight"),
                names("self_attn.v_proj.weight"),
            );
            let q = load_part(&qn, &[nq, h], q_rows)?;
            let k = load_part(&kn, &[nkv, h], kv_rows)?;
            let v = load_part(&vn, &[nkv, h], kv_rows)?;
            let qkv = linear(
                Tensor::f_cat(&[q, k, v], 0)?,
                &[
                    (qn, [nq, h], q_rows),
                    (kn, [nkv, h], kv_rows),
                    (vn, [nkv, h], kv_rows),
                ],
            )?;
            let qkv_bias = if c.attention_bias {
                let qb = load_part(&names("self_attn.q_proj.bias"), &[nq], q_rows)?;
                let kb = load_part(&names("self_attn.k_proj.bias"), &[nkv], kv_rows)?;
                let vb = load_part(&names("self_attn.v_proj.bias"), &[nkv], kv_rows)?;
                Some(Tensor::f_cat(&[qb, kb, vb], 0)?)
            } else {
                None
            };
            let (gn, un, on, dn) = (
                names("mlp.gate_proj.weight"),
                names("mlp.up_proj.weight"),
                names("self_attn.o_proj.weight"),
                names("mlp.down_proj.weight"),
            );
            let gate = load_part(&gn, &[inter, h], inter_rows)?;
            let up = load_part(&un, &[inter, h], inter_rows)?;
            let o_cols = cols(&part.heads, hd);
            let down_cols = cols(&part.intermediate, 1);
            layers.push(Layer {
                attn_norm: load(&names("input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o_proj: linear(load_part(&on, &[h, nq], o_cols)?, &[(on, [h, nq], o_cols)])?,
                mlp_norm: load(&names("post_attention_layernorm.weight"), &[h])?,
                gate_up: linear(
                    Tensor::f_cat(&[gate, up], 0)?,
                    &[(gn, [inter, h], inter_rows), (un, [inter, h], inter_rows)],
                )?,
                down: linear(
                    load_part(&dn, &[h, inter], down_cols)?,
                    &[(dn, [h, inter], down_cols)],
                )?,
            });
            // Give this layer's load temporaries back before the next layer's arrive.
            crate::memory::release_free_memory();
        }
        let norm = load("model.norm.weight", &[h])?;
        let lm_head = Linear::dense(
            if c.tie_word_embeddings || !source.contains("lm_head.weight") {
                embed.shallow_clone()
            } else {
                load_part("lm_head.weight", &[c.vocab_size, h], vocab_rows)?
            },
        );
        let lm_head = if compress {
            lm_head.with_int8_in(compute)?
        } else {
            lm_head
        };
        // A tied head's plain weight is the embedding table, which stays in use; an
        // untied head keeps only its packed copy.
        let tied = c.tie_word_embeddings || !source.contains("lm_head.weight");
        let lm_head = lm_head.with_packed(tied);
        let inv: Vec<f32> = c.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = Tensor::f_from_slice(&inv)?.f_to_device(device)?;
        Ok(Self {
            config,
            part,
            comm,
            kind,
            device,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_host: inv,
        })
    }

    /// This rank's part of the model.
    pub fn partition(&self) -> &Partition {
        &self.part
    }

    /// Time this rank has spent in collectives.
    pub fn collective_time(&self) -> CollectiveTime {
        self.comm.time_spent()
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// RMSNorm: one pass per row on the CPU (see `cpu_norm`), libtorch's elsewhere.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if crate::cpu_norm::supports(x) {
            return crate::cpu_norm::rms_norm(x, weight, self.config.rms_norm_eps);
        }
        let h = self.config.hidden_size as i64;
        Ok(x.f_rms_norm([h], Some(weight), self.config.rms_norm_eps)?)
    }

    /// cos and sin of every new token's position, `[T, 1, head_dim]` in the model dtype.
    fn rotary(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&self.inv_freq.f_unsqueeze(0)?)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok((
            emb.f_cos()?.f_to_kind(self.kind)?,
            emb.f_sin()?.f_to_kind(self.kind)?,
        ))
    }

    fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = x.size().last().copied().unwrap_or(0) / 2;
        let x1 = x.f_narrow(-1, 0, half)?;
        let x2 = x.f_narrow(-1, half, half)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], -1)?;
        Ok(x.f_mul(cos)?.f_add(&rotated.f_mul(sin)?)?)
    }

    /// Runs one step and returns the f32 logits of each sequence's last token, `[B, vocab]`.
    pub fn forward(&self, cache: &mut KvCache, input: &StepInput) -> Result<Tensor> {
        let c = &self.config;
        let (nh, nkv, hd) = (
            self.part.num_heads() as i64,
            self.part.num_kv_heads() as i64,
            c.head_dim as i64,
        );
        let t = input.tokens.size().first().copied().unwrap_or(0);
        // On the CPU the rotation runs in place on each layer's q/k/v (see `cpu_rotary`).
        let rotary = if RotaryTable::supports(self.kind, self.device) {
            Rotary::InPlace(RotaryTable::new(
                &input.positions,
                &self.inv_freq_host,
                self.kind,
            )?)
        } else {
            let (cos, sin) = self.rotary(&input.positions)?;
            Rotary::Operators(cos, sin)
        };
        let mut hidden = self.embed_tokens(&input.tokens)?;
        mark("embedding");
        for (i, layer) in self.layers.iter().enumerate() {
            let x = self.rms_norm(&hidden, &layer.attn_norm)?;
            mark("norms");
            let mut qkv = layer.qkv.forward(&x)?;
            if let Some(bias) = &layer.qkv_bias {
                qkv = qkv.f_add(bias)?;
            }
            mark("qkv_proj");
            // Rotary embedding on the query and key heads together, in one pass.
            let qk = match &rotary {
                Rotary::InPlace(table) => {
                    table.apply(&mut qkv, (nh + nkv) as usize)?;
                    qkv.f_narrow(1, 0, (nh + nkv) * hd)?
                        .f_view([t, nh + nkv, hd])?
                }
                Rotary::Operators(cos, sin) => {
                    let qk = qkv
                        .f_narrow(1, 0, (nh + nkv) * hd)?
                        .f_view([t, nh + nkv, hd])?;
                    Self::apply_rotary(&qk, cos, sin)?
                }
            };
            mark("rotary");
            let q = qk.f_narrow(1, 0, nh)?;
            let k = qk.f_narrow(1, nh, nkv)?;
            let v = qkv
                .f_narrow(1, (nh + nkv) * hd, nkv * hd)?
                .f_view([t, nkv, hd])?;
            cache.write(i, &input.slots, &input.slots_host, &k, &v)?;
            mark("kv_write");
            let attn = attention::attend(
                &input.attention,
                &q,
                &k,
                &v,
                &cache.keys[i],
                &cache.values[i],
                nkv,
            )?;
            mark("attention");
            hidden = hidden.f_add(&self.reduce(layer.o_proj.forward(&attn)?)?)?;
            mark("o_proj");
            let x = self.rms_norm(&hidden, &layer.mlp_norm)?;
            mark("norms");
            let gate_up = layer.gate_up.forward(&x)?;
            mark("gate_up_proj");
            let inter = self.part.intermediate.len() as i64;
            let act = if crate::cpu_mlp::supports(&gate_up) {
                crate::cpu_mlp::silu_mul(&gate_up, inter as usize)?
            } else {
                let gate = gate_up.f_narrow(1, 0, inter)?;
                let up = gate_up.f_narrow(1, inter, inter)?;
                gate.f_silu()?.f_mul(&up)?
            };
            mark("activation");
            hidden = hidden.f_add(&self.reduce(layer.down.forward(&act)?)?)?;
            mark("down_proj");
        }
        if input.last_index.numel() == 0 {
            // Only prefill-only chunks: their keys and values are written, no logits wanted.
            return Ok(Tensor::f_zeros(
                [0, self.config.vocab_size as i64],
                (Kind::Float, self.device),
            )?);
        }
        let last = hidden.f_index_select(0, &input.last_index)?;
        let last = self.rms_norm(&last, &self.norm)?;
        let logits = self.lm_head.forward_f32(&last)?;
        let logits = self.gather_vocab(logits)?.f_to_kind(Kind::Float)?;
        mark("lm_head");
        Ok(logits)
    }

    /// Sums a row-parallel layer's partial outputs over the ranks.
    fn reduce(&self, mut partial: Tensor) -> Result<Tensor> {
        if !self.part.is_single() {
            partial = partial.f_contiguous()?;
            self.comm.all_reduce_sum(&mut partial)?;
        }
        Ok(partial)
    }

    /// Embeddings of `tokens`: each rank looks up the ids in its vocabulary slice (zero
    /// for the others) and the ranks' rows are summed.
    fn embed_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        if self.part.is_single() {
            return Ok(self.embed.f_index_select(0, tokens)?);
        }
        let (start, len) = (self.part.vocab.start as i64, self.part.vocab.len() as i64);
        let local = tokens.f_sub_scalar(start)?;
        let mine = local.f_ge(0)?.f_logical_and(&local.f_lt(len)?)?;
        let rows = self
            .embed
            .f_index_select(0, &local.f_clamp(0, len - 1)?)?
            .f_mul(&mine.f_unsqueeze(-1)?.f_to_kind(self.kind)?)?;
        self.reduce(rows)
    }

    /// Full-vocabulary logits from each rank's slice (padded to equal widths).
    fn gather_vocab(&self, logits: Tensor) -> Result<Tensor> {
        if self.part.is_single() {
            return Ok(logits);
        }
        let [rows, cols] = logits.size()[..] else {
            return Ok(logits);
        };
        let chunk = self.part.vocab_chunk as i64;
        let padded = if cols < chunk {
            Tensor::f_cat(
                &[
                    logits.shallow_clone(),
                    Tensor::f_zeros([rows, chunk - cols], (logits.kind(), logits.device()))?,
                ],
                1,
            )?
        } else {
            logits.f_contiguous()?
        };
        let all = self.comm.all_gather(&padded, 1)?;
        Ok(all.f_narrow(1, 0, self.config.vocab_size as i64)?)
    }
}
