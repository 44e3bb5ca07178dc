//! The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM, TinyLlama) on libtorch.
//! The model is immutable; the paged KV cache is passed in for every step.

use tch::{Device, Kind, Tensor};
use tessera_model::config::ModelConfig;

use crate::attention::{self, AttentionPlan};
use crate::error::Result;
use crate::kv_cache::KvCache;
use crate::linear::{Int4Codes, Linear};
use crate::weights::WeightSource;

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
    kind: Kind,
    device: Device,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Tensor,
}

/// One forward step over a flattened batch of `T` new tokens from `B` sequences.
pub struct StepInput {
    /// `[T]` token ids.
    pub tokens: Tensor,
    /// `[T]` absolute positions.
    pub positions: Tensor,
    /// `[T]` KV pool slots the new keys and values are written to.
    pub slots: Tensor,
    /// `[B]` index into `T` of each sequence's last token (its logits are returned).
    pub last_index: Tensor,
    pub attention: AttentionPlan,
}

impl Llama {
    pub fn load(
        source: &WeightSource,
        config: ModelConfig,
        kind: Kind,
        device: Device,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let load = |name: &str, shape: &[usize]| source.load(c, name, shape, kind, device);
        // Compressed copies for small CPU batches, in reduced precision only (f32 stays
        // exact for reference checks).
        let compress = device == Device::Cpu && matches!(kind, Kind::BFloat16 | Kind::Half);
        let linear = |dense: Tensor, parts: &[(String, [usize; 2])]| -> Result<Linear> {
            let linear = Linear::dense(dense);
            if !compress {
                return Ok(linear);
            }
            let mut codes = Vec::with_capacity(parts.len());
            for (name, shape) in parts {
                match source.int4_codes(c, name, shape)? {
                    Some(code) => codes.push(code),
                    None => return Ok(linear),
                }
            }
            match Int4Codes::concat(codes) {
                Some(codes) => linear.with_int4(codes, kind),
                None => Ok(linear),
            }
        };
        let embed = load("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let q = load(
                &format!("{p}.self_attn.q_proj.weight"),
                &[c.num_heads * hd, h],
            )?;
            let k = load(
                &format!("{p}.self_attn.k_proj.weight"),
                &[c.num_kv_heads * hd, h],
            )?;
            let v = load(
                &format!("{p}.self_attn.v_proj.weight"),
                &[c.num_kv_heads * hd, h],
            )?;
            let (nq, nkv) = (c.num_heads * hd, c.num_kv_heads * hd);
            let qkv = linear(
                Tensor::f_cat(&[q, k, v], 0)?,
                &[
                    (format!("{p}.self_attn.q_proj.weight"), [nq, h]),
                    (format!("{p}.self_attn.k_proj.weight"), [nkv, h]),
                    (format!("{p}.self_attn.v_proj.weight"), [nkv, h]),
                ],
            )?;
            let qkv_bias = if c.attention_bias {
                let qb = load(&format!("{p}.self_attn.q_proj.bias"), &[c.num_heads * hd])?;
                let kb = load(
                    &format!("{p}.self_attn.k_proj.bias"),
                    &[c.num_kv_heads * hd],
                )?;
                let vb = load(
                    &format!("{p}.self_attn.v_proj.bias"),
                    &[c.num_kv_heads * hd],
                )?;
                Some(Tensor::f_cat(&[qb, kb, vb], 0)?)
            } else {
                None
            };
            let gate = load(
                &format!("{p}.mlp.gate_proj.weight"),
                &[c.intermediate_size, h],
            )?;
            let up = load(
                &format!("{p}.mlp.up_proj.weight"),
                &[c.intermediate_size, h],
            )?;
            layers.push(Layer {
                attn_norm: load(&format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                qkv_bias,
                o_proj: linear(
                    load(&format!("{p}.self_attn.o_proj.weight"), &[h, nq])?,
                    &[(format!("{p}.self_attn.o_proj.weight"), [h, nq])],
                )?,
                mlp_norm: load(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up: linear(
                    Tensor::f_cat(&[gate, up], 0)?,
                    &[
                        (
                            format!("{p}.mlp.gate_proj.weight"),
                            [c.intermediate_size, h],
                        ),
                        (format!("{p}.mlp.up_proj.weight"), [c.intermediate_size, h]),
                    ],
                )?,
                down: linear(
                    load(
                        &format!("{p}.mlp.down_proj.weight"),
                        &[h, c.intermediate_size],
                    )?,
                    &[(
                        format!("{p}.mlp.down_proj.weight"),
                        [h, c.intermediate_size],
                    )],
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
                load("lm_head.weight", &[c.vocab_size, h])?
            },
        );
        let lm_head = if compress {
            lm_head.with_int8()?
        } else {
            lm_head
        };
        let inv: Vec<f32> = c.rope_inv_freq().iter().map(|&f| f as f32).collect();
        let inv_freq = Tensor::f_from_slice(&inv)?.f_to_device(device)?;
        Ok(Self {
            config,
            kind,
            device,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
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

    /// RMSNorm (libtorch's fused kernel, which accumulates in f32 for reduced precision).
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
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
        let (nh, nkv, hd) = (c.num_heads as i64, c.num_kv_heads as i64, c.head_dim as i64);
        let t = input.tokens.size().first().copied().unwrap_or(0);
        let (cos, sin) = self.rotary(&input.positions)?;
        let mut hidden = self.embed.f_index_select(0, &input.tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let x = self.rms_norm(&hidden, &layer.attn_norm)?;
            let mut qkv = layer.qkv.forward(&x)?;
            if let Some(bias) = &layer.qkv_bias {
                qkv = qkv.f_add(bias)?;
            }
            // Rotary embedding on the query and key heads together, in one pass.
            let qk = qkv
                .f_narrow(1, 0, (nh + nkv) * hd)?
                .f_view([t, nh + nkv, hd])?;
            let qk = Self::apply_rotary(&qk, &cos, &sin)?;
            let q = qk.f_narrow(1, 0, nh)?;
            let k = qk.f_narrow(1, nh, nkv)?;
            let v = qkv
                .f_narrow(1, (nh + nkv) * hd, nkv * hd)?
                .f_view([t, nkv, hd])?;
            let _ = cache.keys[i].f_index_copy_(0, &input.slots, &k)?;
            let _ = cache.values[i].f_index_copy_(0, &input.slots, &v)?;
            let attn = attention::attend(
                &input.attention,
                &q,
                &k,
                &v,
                &cache.keys[i],
                &cache.values[i],
                nkv,
            )?;
            hidden = hidden.f_add(&layer.o_proj.forward(&attn)?)?;
            let x = self.rms_norm(&hidden, &layer.mlp_norm)?;
            let gate_up = layer.gate_up.forward(&x)?;
            let inter = c.intermediate_size as i64;
            let gate = gate_up.f_narrow(1, 0, inter)?;
            let up = gate_up.f_narrow(1, inter, inter)?;
            let act = gate.f_silu()?.f_mul(&up)?;
            hidden = hidden.f_add(&layer.down.forward(&act)?)?;
        }
        let last = hidden.f_index_select(0, &input.last_index)?;
        let last = self.rms_norm(&last, &self.norm)?;
        Ok(self.lm_head.forward(&last)?.f_to_kind(Kind::Float)?)
    }
}
