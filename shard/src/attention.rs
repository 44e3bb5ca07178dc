//! Attention over the paged KV cache, in the two shapes a step can take.
//!
//! Prefill (fresh prompts) uses libtorch's fused causal `scaled_dot_product_attention`
//! on each prompt's own keys. Decode (one query per sequence) gathers each sequence's
//! cached keys and values from the pool through its block table and groups the queries
//! by KV head, which on CPU is far cheaper than SDPA for single-query attention
//! (see the measurements in design.md).

use tch::{Kind, Tensor};

use crate::cpu_attention::{self, DecodeContexts};
use crate::error::Result;

/// One prompt's rows in a prefill: `len` rows from `offset`, the positions after its
/// cached prefix, whose pool slots (device tensor, position order) are `prefix`.
pub struct PromptSpan {
    pub offset: i64,
    pub len: i64,
    pub prefix: Option<Tensor>,
}

pub enum AttentionPlan {
    /// Fresh prompts, one span each.
    Prefill(Vec<PromptSpan>),
    /// One new token per sequence, the batch cut into groups of sequences with
    /// similar context lengths (contiguous in the batch, in order), so that padding to
    /// each group's longest context wastes little.
    Decode(Vec<DecodeGroup>),
    /// One new token per sequence, attended on the CPU in place in the pools (see
    /// `cpu_attention`), without gathering or padding.
    DecodeInPlace(DecodeContexts),
    /// Fresh prompts in rows `0..decode_from` (spans as in `Prefill`), then one new
    /// token per running sequence from row `decode_from` on, planned by `decode`: a
    /// prefill and a decode step sharing one forward pass.
    Mixed {
        prefill: Vec<PromptSpan>,
        decode_from: i64,
        decode: Box<AttentionPlan>,
    },
}

/// Sequences `start..start + count` of a decode batch. With the pools viewed as
/// `[slots * kv_heads, head_dim]`, `rows` (`[count * kv_heads * L]`) lists the rows of
/// each sequence's context, ordered by sequence, KV head and position (padded to the
/// group's longest context `L`), so that one gather yields `[count * kv_heads, L,
/// head_dim]` without any transpose; `mask` is `[count, 1, 1, L]`, 0 for real positions
/// and -inf for padding.
pub struct DecodeGroup {
    pub start: i64,
    pub count: i64,
    pub len: i64,
    pub rows: Tensor,
    pub mask: Tensor,
}

/// Cuts contexts of ascending lengths `lens` into at most `max_groups` contiguous
/// groups, minimising the padded work (each group costs `count * longest`, plus
/// `group_cost` for the extra operator calls a group adds). Returns `(start, end)` pairs.
pub fn plan_decode_groups(
    lens: &[usize],
    max_groups: usize,
    group_cost: usize,
) -> Vec<(usize, usize)> {
    let n = lens.len();
    if n == 0 {
        return Vec::new();
    }
    let k = max_groups.clamp(1, n);
    // best[g][j]: least cost of the first j sequences in g groups; cut[g][j]: where the last starts.
    let mut best = vec![vec![usize::MAX; n + 1]; k + 1];
    let mut cut = vec![vec![0usize; n + 1]; k + 1];
    best[0][0] = 0;
    for g in 1..=k {
        for j in 1..=n {
            for i in (g - 1)..j {
                if best[g - 1][i] == usize::MAX {
                    continue;
                }
                let cost = best[g - 1][i] + (j - i) * lens[j - 1] + group_cost;
                if cost < best[g][j] {
                    best[g][j] = cost;
                    cut[g][j] = i;
                }
            }
        }
    }
    let g = (1..=k).min_by_key(|&g| best[g][n]).unwrap_or(1);
    let mut groups = Vec::with_capacity(g);
    let (mut g, mut j) = (g, n);
    while g > 0 {
        let i = cut[g][j];
        groups.push((i, j));
        j = i;
        g -= 1;
    }
    groups.reverse();
    groups
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
            prefill(spans, q, k, v, (k_pool, v_pool), heads != kv_heads)?
                .f_reshape([t, heads * head_dim])
                .map_err(Into::into)
        }
        AttentionPlan::Decode(groups) => {
            let mut outs = Vec::with_capacity(groups.len());
            for g in groups {
                outs.push(decode_group(
                    g,
                    &q.f_narrow(0, g.start, g.count)?,
                    k_pool,
                    v_pool,
                    kv_heads,
                )?);
            }
            if outs.len() == 1 {
                return Ok(outs.remove(0));
            }
            Ok(Tensor::f_cat(&outs, 0)?)
        }
        AttentionPlan::DecodeInPlace(contexts) => {
            cpu_attention::attend(contexts, q, k_pool, v_pool)
        }
        AttentionPlan::Mixed {
            prefill: spans,
            decode_from,
            decode,
        } => {
            let (p, d) = (*decode_from, t - *decode_from);
            let fresh = prefill(
                spans,
                &q.f_narrow(0, 0, p)?,
                &k.f_narrow(0, 0, p)?,
                &v.f_narrow(0, 0, p)?,
                (k_pool, v_pool),
                heads != kv_heads,
            )?
            .f_reshape([p, heads * head_dim])?;
            let running = attend(
                decode,
                &q.f_narrow(0, p, d)?,
                &k.f_narrow(0, p, d)?,
                &v.f_narrow(0, p, d)?,
                k_pool,
                v_pool,
                kv_heads,
            )?;
            Ok(Tensor::f_cat(&[fresh, running], 0)?)
        }
    }
}

/// Causal attention of each prompt (`spans` of the rows of `q`, `k`, `v`) over its
/// own keys, after its cached prefix's keys and values read from the pools;
/// `[rows, heads, head_dim]`.
fn prefill(
    spans: &[PromptSpan],
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pools: (&Tensor, &Tensor),
    gqa: bool,
) -> Result<Tensor> {
    let mut outs = Vec::with_capacity(spans.len());
    for span in spans {
        let rows = |x: &Tensor| x.f_narrow(0, span.offset, span.len);
        // [1, heads, len, head_dim], as SDPA wants it.
        let heads_first =
            |x: Tensor| -> Result<Tensor> { Ok(x.f_transpose(0, 1)?.f_unsqueeze(0)?) };
        let out = match &span.prefix {
            None => Tensor::f_scaled_dot_product_attention::<Tensor>(
                &heads_first(rows(q)?)?,
                &heads_first(rows(k)?)?,
                &heads_first(rows(v)?)?,
                None,
                0.0,
                true,
                None,
                gqa,
            )?,
            Some(slots) => {
                let cached = slots.size()[0];
                let keys = Tensor::f_cat(&[pools.0.f_index_select(0, slots)?, rows(k)?], 0)?;
                let values = Tensor::f_cat(&[pools.1.f_index_select(0, slots)?, rows(v)?], 0)?;
                // Row i (position cached + i) sees keys 0..=cached + i; SDPA's own causal
                // mask would align the rows with the first keys instead.
                let device = q.device();
                let key_pos = Tensor::f_arange(cached + span.len, (Kind::Int64, device))?;
                let row_pos =
                    Tensor::f_arange(span.len, (Kind::Int64, device))?.f_add_scalar(cached)?;
                let mask = key_pos
                    .f_unsqueeze(0)?
                    .f_le_tensor(&row_pos.f_unsqueeze(1)?)?;
                Tensor::f_scaled_dot_product_attention(
                    &heads_first(rows(q)?)?,
                    &heads_first(keys)?,
                    &heads_first(values)?,
                    Some(&mask),
                    0.0,
                    false,
                    None,
                    gqa,
                )?
            }
        };
        outs.push(out.f_squeeze_dim(0)?.f_transpose(0, 1)?);
    }
    Ok(Tensor::f_cat(&outs, 0)?)
}

/// Single-query attention of one group of sequences; returns `[count, heads * head_dim]`.
fn decode_group(
    g: &DecodeGroup,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    kv_heads: i64,
) -> Result<Tensor> {
    let [b, heads, head_dim] = dims3(q);
    let l = g.len;
    // Batched matmuls over contiguous [B * kv_heads, L, head_dim] blocks: libtorch's
    // 4-D matmul on permuted views is several times slower on CPU.
    let group = heads / kv_heads;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let per_head = |pool: &Tensor| -> Result<Tensor> {
        Ok(pool
            .f_view([-1, head_dim])?
            .f_index_select(0, &g.rows)?
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
        .f_add(&g.mask)?;
    let probs = scores
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(q.kind())?
        .f_view([b * kv_heads, group, l])?;
    Ok(probs.f_bmm(&values)?.f_reshape([b, heads * head_dim])?)
}

fn dims3(x: &Tensor) -> [i64; 3] {
    let s = x.size();
    [
        s.first().copied().unwrap_or(0),
        s.get(1).copied().unwrap_or(0),
        s.get(2).copied().unwrap_or(0),
    ]
}

#[cfg(test)]
mod tests {
    use super::plan_decode_groups;

    #[test]
    fn equal_lengths_make_one_group() {
        assert_eq!(plan_decode_groups(&[100; 8], 4, 64), vec![(0, 8)]);
        assert_eq!(plan_decode_groups(&[], 4, 64), Vec::<(usize, usize)>::new());
        assert_eq!(plan_decode_groups(&[7], 4, 64), vec![(0, 1)]);
    }

    #[test]
    fn far_apart_lengths_are_split() {
        let lens = [40, 40, 40, 40, 150, 150, 150, 150, 560, 560, 560, 560];
        assert_eq!(
            plan_decode_groups(&lens, 4, 64),
            vec![(0, 4), (4, 8), (8, 12)]
        );
        // A high cost per group keeps them together.
        assert_eq!(plan_decode_groups(&lens, 4, 100_000), vec![(0, 12)]);
        // At most max_groups.
        assert_eq!(plan_decode_groups(&lens, 2, 64).len(), 2);
    }

    #[test]
    fn groups_cover_the_batch_in_order() {
        let lens: Vec<usize> = (0..50).map(|i| 10 + i * i).collect();
        let groups = plan_decode_groups(&lens, 4, 256);
        assert_eq!(groups.first().map(|g| g.0), Some(0));
        assert_eq!(groups.last().map(|g| g.1), Some(50));
        for w in groups.windows(2) {
            assert_eq!(w[0].1, w[1].0);
        }
    }
}
