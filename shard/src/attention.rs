//! Attention over the paged KV cache, in the two shapes a step can take.
//!
//! Prefill (fresh prompts) uses libtorch's fused causal `scaled_dot_product_attention`
//! on each prompt's own keys. Decode (one query per sequence) gathers each sequence's
//! cached keys and values from the pool through its block table and groups the queries
//! by KV head, which on CPU is far cheaper than SDPA for single-query attention
//! (see the measurements in design.md).

use tch::{Kind, Tensor};

use crate::error::Result;

pub enum AttentionPlan {
    /// Fresh prompts: `(offset, length)` of each sequence in the flattened batch.
    Prefill(Vec<(i64, i64)>),
    /// One new token per sequence. With the pools viewed as `[slots * kv_heads, head_dim]`,
    /// `rows` (`[B * kv_heads * L]`) lists the rows of each sequence's context, ordered by
    /// sequence, KV head and position (padded to the longest context `L`), so that one
    /// gather yields `[B * kv_heads, L, head_dim]` without any transpose; `mask` is
    /// `[B, 1, 1, L]`, 0 for real positions and -inf for padding.
    Decode { rows: Tensor, mask: Tensor },
}

/// `q` is `[T, heads, head_dim]`, `k` and `v` are `[T, kv_heads, head_dim]` (already
/// written to the pools). Returns `[T, heads * head_dim]`.
pub fn attend(
    plan: &AttentionPlan,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    kv_heads: i64,
) -> Result<Tensor> {
    let [t, heads, head_dim] = dims3(q);
    match plan {
        AttentionPlan::Prefill(spans) => {
            let mut outs = Vec::with_capacity(spans.len());
            for &(offset, len) in spans {
                let per_seq = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.f_narrow(0, offset, len)?
                        .f_transpose(0, 1)?
                        .f_unsqueeze(0)?)
                };
                let out = Tensor::f_scaled_dot_product_attention::<Tensor>(
                    &per_seq(q)?,
                    &per_seq(k)?,
                    &per_seq(v)?,
                    None,
                    0.0,
                    true,
                    None,
                    heads != kv_heads,
                )?;
                outs.push(out.f_squeeze_dim(0)?.f_transpose(0, 1)?);
            }
            Ok(Tensor::f_cat(&outs, 0)?.f_reshape([t, heads * head_dim])?)
        }
        AttentionPlan::Decode { rows, mask } => {
            // Batched matmuls over contiguous [B * kv_heads, L, head_dim] blocks: libtorch's
            // 4-D matmul on permuted views is several times slower on CPU.
            let b = t;
            let l = mask.size().last().copied().unwrap_or(0);
            let group = heads / kv_heads;
            let scale = 1.0 / (head_dim as f64).sqrt();
            let per_head = |pool: &Tensor| -> Result<Tensor> {
                Ok(pool
                    .f_view([-1, head_dim])?
                    .f_index_select(0, rows)?
                    .f_view([b * kv_heads, l, head_dim])?)
            };
            let keys = per_head(k_pool)?;
            let values = per_head(v_pool)?;
            if b == 1 {
                // One sequence has no padding: libtorch's fused attention needs no mask and
                // costs fewer operator calls than the grouped matmuls below.
                let out = Tensor::f_scaled_dot_product_attention::<Tensor>(
                    &q.f_reshape([1, heads, 1, head_dim])?,
                    &keys.f_unsqueeze(0)?,
                    &values.f_unsqueeze(0)?,
                    None,
                    0.0,
                    false,
                    None,
                    heads != kv_heads,
                )?;
                return Ok(out.f_reshape([1, heads * head_dim])?);
            }
            let q = q.f_reshape([b * kv_heads, group, head_dim])?;
            let scores = q
                .f_bmm(&keys.f_transpose(1, 2)?)?
                .f_view([b, kv_heads, group, l])?
                .f_to_kind(Kind::Float)?
                .f_mul_scalar(scale)?
                .f_add(mask)?;
            let probs = scores
                .f_softmax(-1, Kind::Float)?
                .f_to_kind(q.kind())?
                .f_view([b * kv_heads, group, l])?;
            Ok(probs.f_bmm(&values)?.f_reshape([b, heads * head_dim])?)
        }
    }
}

fn dims3(x: &Tensor) -> [i64; 3] {
    let s = x.size();
    [
        s.first().copied().unwrap_or(0),
        s.get(1).copied().unwrap_or(0),
        s.get(2).copied().unwrap_or(0),
    ]
}
