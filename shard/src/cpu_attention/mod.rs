//! Single-query (decode) attention on the CPU, read in place from the paged KV pool.
//!
//! libtorch has no paged attention on the CPU: the generic path gathers every
//! sequence's keys and values into padded contiguous blocks and then runs small
//! batched matmuls and a masked softmax, about a dozen operator calls per layer whose
//! cost at 32 sequences is mostly dispatch, copies and padding. This kernel walks each
//! sequence's own slots instead: for every (sequence, KV head) it converts each cached
//! key row to f32 once, scores it against all the query heads of that KV head (grouped-
//! query attention), takes a softmax in f32 and accumulates the value rows the same way.
//! Sequences are independent, so a sequence's result does not depend on the batch it
//! runs in.
//!
//! Sequences are spread over libtorch's own intra-op threads (see `parallel`), in
//! groups of similar total context length.

use half::{bf16, f16};
use tch::{Kind, Tensor};

use crate::element::Element;
use crate::error::{EngineError, Result};
use crate::parallel;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// The cached context of every sequence of a decode step: the pool slots of sequence
/// `i` are `slots[offsets[i]..offsets[i + 1]]`, in position order (its newest token last).
pub struct DecodeContexts {
    pub slots: Vec<i64>,
    pub offsets: Vec<usize>,
}

impl DecodeContexts {
    pub fn new() -> Self {
        Self {
            slots: Vec::new(),
            offsets: vec![0],
        }
    }

    /// Appends one sequence's context.
    pub fn push(&mut self, slots: impl IntoIterator<Item = i64>) {
        self.slots.extend(slots);
        self.offsets.push(self.slots.len());
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn sequence(&self, i: usize) -> &[i64] {
        &self.slots[self.offsets[i]..self.offsets[i + 1]]
    }
}

impl Default for DecodeContexts {
    fn default() -> Self {
        Self::new()
    }
}

/// Whether [`attend`] handles pools of this kind.
pub fn supports(kind: Kind) -> bool {
    matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half)
}

/// `q` is `[B, heads, head_dim]`; the pools are `[slots, kv_heads, head_dim]`,
/// contiguous, on the CPU. Returns `[B, heads * head_dim]` in `q`'s kind.
pub fn attend(
    contexts: &DecodeContexts,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
) -> Result<Tensor> {
    attend_with(contexts, q, k_pool, v_pool, Implementation::Best)
}

fn attend_with(
    contexts: &DecodeContexts,
    q: &Tensor,
    k_pool: &Tensor,
    v_pool: &Tensor,
    implementation: Implementation,
) -> Result<Tensor> {
    let qs = q.size();
    let ps = k_pool.size();
    let (&[b, heads, head_dim], &[pool_slots, kv_heads, pool_dim]) = (&qs[..], &ps[..]) else {
        return Err(shape_error(format!(
            "query {qs:?} and pool {ps:?} must be 3-D"
        )));
    };
    if b as usize != contexts.len()
        || pool_dim != head_dim
        || kv_heads == 0
        || heads % kv_heads != 0
        || v_pool.size() != ps
    {
        return Err(shape_error(format!(
            "query {qs:?}, key pool {ps:?}, value pool {:?}, {} sequences",
            v_pool.size(),
            contexts.len()
        )));
    }
    if let Some(&bad) = contexts.slots.iter().find(|&&s| s < 0 || s >= pool_slots) {
        return Err(shape_error(format!(
            "slot {bad} is outside the pool of {pool_slots} slots"
        )));
    }
    let shape = Shape {
        heads: heads as usize,
        kv_heads: kv_heads as usize,
        head_dim: head_dim as usize,
    };
    if q.kind() != k_pool.kind() || v_pool.kind() != k_pool.kind() {
        return Err(shape_error(format!(
            "query {:?} and pools {:?}/{:?} must have one kind",
            q.kind(),
            k_pool.kind(),
            v_pool.kind()
        )));
    }
    // Each sequence's query heads must be contiguous (a token's row of the q/k/v
    // projection is); other layouts are copied once.
    let st = q.stride();
    let q = if st.get(1) == Some(&head_dim) && st.get(2) == Some(&1) {
        q.shallow_clone()
    } else {
        q.f_contiguous()?
    };
    let out = Tensor::f_empty([b, heads * head_dim], (q.kind(), tch::Device::Cpu))?;
    let k_pool = k_pool.f_contiguous()?;
    let v_pool = v_pool.f_contiguous()?;
    let io = Io {
        query: q.data_ptr() as usize,
        query_stride: q.stride()[0] as usize,
        out: out.data_ptr() as usize,
    };
    if b > 0 && (io.query == 0 || io.out == 0) {
        return Err(shape_error(
            "query or output storage is not addressable".into(),
        ));
    }
    match k_pool.kind() {
        Kind::BFloat16 => run::<bf16>(contexts, &shape, &io, &k_pool, &v_pool, implementation),
        Kind::Half => run::<f16>(contexts, &shape, &io, &k_pool, &v_pool, implementation),
        Kind::Float => run::<f32>(contexts, &shape, &io, &k_pool, &v_pool, implementation),
        other => return Err(shape_error(format!("unsupported KV cache kind {other:?}"))),
    }?;
    Ok(out)
}

/// Where the queries are read and the outputs written, as addresses of elements of the
/// pools' type: sequence `i`'s `heads * head_dim` query elements start at
/// `query + i * query_stride`, its output row at `out + i * heads * head_dim`.
struct Io {
    query: usize,
    query_stride: usize,
    out: usize,
}

fn shape_error(message: String) -> EngineError {
    EngineError::Attention(message)
}

struct Shape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// An element type of the KV pool (and of the queries and outputs).
trait PoolElement: Element + 'static + SimdLoad {
    const KIND: Kind;
}

/// What the AVX-512 kernel needs of an element (nothing off x86_64).
#[cfg(target_arch = "x86_64")]
use avx512::Load16 as SimdLoad;
#[cfg(not(target_arch = "x86_64"))]
trait SimdLoad {}
#[cfg(not(target_arch = "x86_64"))]
impl<T> SimdLoad for T {}

impl PoolElement for bf16 {
    const KIND: Kind = Kind::BFloat16;
}

impl PoolElement for f16 {
    const KIND: Kind = Kind::Half;
}

impl PoolElement for f32 {
    const KIND: Kind = Kind::Float;
}

/// Borrows a contiguous CPU tensor of element type `T` as a slice.
fn as_slice<T: PoolElement>(t: &Tensor) -> Result<&[T]> {
    if t.kind() != T::KIND || t.device() != tch::Device::Cpu || !t.is_contiguous() {
        return Err(shape_error(format!(
            "KV pool must be a contiguous CPU tensor of {:?}, got {:?} on {:?}",
            T::KIND,
            t.kind(),
            t.device()
        )));
    }
    let len = t.numel();
    let ptr = t.data_ptr() as *const T;
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(shape_error("KV pool storage is not addressable".into()));
    }
    // SAFETY: the tensor is contiguous, on the CPU, of element type T (checked above) and
    // holds `len` elements starting at `ptr`; the borrow of `t` keeps its storage alive,
    // and nothing writes to the pools while attention reads them (the engine thread
    // owns the cache and runs one operation at a time).
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

/// Which implementation [`run`] uses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Implementation {
    /// AVX-512 intrinsics where the processor and the head size allow, else portable.
    Best,
    /// The portable loop only (tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

fn run<T: PoolElement>(
    contexts: &DecodeContexts,
    shape: &Shape,
    io: &Io,
    k_pool: &Tensor,
    v_pool: &Tensor,
    implementation: Implementation,
) -> Result<()> {
    let keys = as_slice::<T>(k_pool)?;
    let values = as_slice::<T>(v_pool)?;
    let scale = 1.0 / (shape.head_dim as f32).sqrt();
    let width = shape.heads * shape.head_dim;
    let simd = implementation == Implementation::Best && simd_available(shape.head_dim);
    // Sequences are spread over libtorch's threads in groups of similar total context.
    let lens: Vec<usize> = (0..contexts.len())
        .map(|i| contexts.sequence(i).len())
        .collect();
    let groups = parallel::balance(&lens, tch::get_num_threads().max(1) as usize);
    parallel::for_each(groups.len(), &|g| {
        let mut scratch = Scratch::default();
        for &seq in &groups[g] {
            // SAFETY: `attend_with` checked that the query is `[B, heads, head_dim]` of
            // `T` with each sequence's heads contiguous at `query_stride`, and made the
            // output `[B, heads * head_dim]` of `T`; `seq < B`. Each sequence belongs to
            // exactly one group, so no two threads write the same output row, and both
            // tensors outlive `for_each`.
            let (q_seq, out_seq) = unsafe {
                (
                    std::slice::from_raw_parts(
                        (io.query as *const T).add(seq * io.query_stride),
                        width,
                    ),
                    std::slice::from_raw_parts_mut((io.out as *mut T).add(seq * width), width),
                )
            };
            scratch.query.clear();
            scratch
                .query
                .extend(q_seq.iter().map(|x| x.widen() * scale));
            scratch.out.resize(width, 0.0);
            let mut out = std::mem::take(&mut scratch.out);
            let query = std::mem::take(&mut scratch.query);
            one_sequence(
                contexts.sequence(seq),
                shape,
                &query,
                keys,
                values,
                &mut out,
                simd,
                &mut scratch,
            );
            for (dst, &x) in out_seq.iter_mut().zip(&out) {
                *dst = T::narrow(x);
            }
            scratch.out = out;
            scratch.query = query;
        }
    })
    .map_err(|e| EngineError::Attention(e.to_string()))
}

#[derive(Default)]
struct Scratch {
    query: Vec<f32>,
    out: Vec<f32>,
    scores: Vec<f32>,
    rows: Vec<usize>,
    head_rows: Vec<usize>,
    widened: Vec<f32>,
}

#[allow(clippy::too_many_arguments)]
fn one_sequence<T: PoolElement>(
    slots: &[i64],
    shape: &Shape,
    q_seq: &[f32],
    keys: &[T],
    values: &[T],
    out_seq: &mut [f32],
    simd: bool,
    scratch: &mut Scratch,
) {
    let Shape {
        heads,
        kv_heads,
        head_dim,
    } = *shape;
    if slots.is_empty() {
        out_seq.fill(0.0);
        return;
    }
    // Slots were checked against the pool size in `attend`.
    let row_stride = kv_heads * head_dim;
    scratch.rows.clear();
    scratch
        .rows
        .extend(slots.iter().map(|&s| s as usize * row_stride));
    scratch.scores.resize(heads * slots.len(), 0.0);
    if simd {
        simd_sequence(
            q_seq,
            keys,
            values,
            &scratch.rows,
            kv_heads,
            &mut scratch.scores,
            out_seq,
            head_dim,
        );
        return;
    }
    let group = heads / kv_heads;
    scratch.widened.resize(head_dim, 0.0);
    for h in 0..kv_heads {
        let span = h * group * head_dim..(h + 1) * group * head_dim;
        scratch.head_rows.clear();
        scratch
            .head_rows
            .extend(scratch.rows.iter().map(|r| r + h * head_dim));
        portable_head_group(
            &q_seq[span.clone()],
            keys,
            values,
            &scratch.head_rows,
            &mut scratch.scores[..group * slots.len()],
            &mut out_seq[span],
            &mut scratch.widened,
        );
    }
}

#[cfg(target_arch = "x86_64")]
fn simd_available(head_dim: usize) -> bool {
    matches!(head_dim, 16 | 32 | 64 | 128 | 256) && std::arch::is_x86_feature_detected!("avx512f")
}

#[cfg(not(target_arch = "x86_64"))]
fn simd_available(_head_dim: usize) -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn simd_sequence<T: PoolElement>(
    query: &[f32],
    keys: &[T],
    values: &[T],
    rows: &[usize],
    kv_heads: usize,
    scores: &mut [f32],
    out: &mut [f32],
    head_dim: usize,
) {
    let s = avx512::Sequence {
        query,
        keys,
        values,
        rows,
        kv_heads,
        scores,
        out,
    };
    // SAFETY: `simd_available` checked AVX-512F and the head size; every slot's row
    // offset plus `kv_heads * head_dim` is within the pools (slots were checked in
    // `attend`); `query`, `out` and `scores` have the sizes `sequence` requires (see `run`).
    unsafe {
        match head_dim {
            16 => avx512::sequence::<_, 1>(s),
            32 => avx512::sequence::<_, 2>(s),
            64 => avx512::sequence::<_, 4>(s),
            128 => avx512::sequence::<_, 8>(s),
            _ => avx512::sequence::<_, 16>(s),
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
fn simd_sequence<T: PoolElement>(
    _query: &[f32],
    _keys: &[T],
    _values: &[T],
    _rows: &[usize],
    _kv_heads: usize,
    _scores: &mut [f32],
    _out: &mut [f32],
    _head_dim: usize,
) {
    unreachable!("simd_available is false off x86_64")
}

// One (sequence, KV head) in plain Rust, vectorized 8 lanes wide on AVX2 processors
// (the AVX-512 ones take `avx512::sequence`).
crate::avx512_variant!(fn portable_head_group<T: PoolElement>(
    query: &[f32],
    keys: &[T],
    values: &[T],
    rows: &[usize],
    scores: &mut [f32],
    out: &mut [f32],
    widened: &mut [f32],
) = portable_head_group_body);

#[inline(always)]
fn portable_head_group_body<T: PoolElement>(
    query: &[f32],
    keys: &[T],
    values: &[T],
    rows: &[usize],
    scores: &mut [f32],
    out: &mut [f32],
    widened: &mut [f32],
) {
    let head_dim = widened.len();
    let len = rows.len();
    for (p, &row) in rows.iter().enumerate() {
        widen_into(&keys[row..row + head_dim], widened);
        for (j, q_head) in query.chunks_exact(head_dim).enumerate() {
            scores[j * len + p] = dot(q_head, widened);
        }
    }
    for s in scores.chunks_exact_mut(len) {
        softmax_in_place(s);
    }
    out.fill(0.0);
    for (p, &row) in rows.iter().enumerate() {
        widen_into(&values[row..row + head_dim], widened);
        for (j, o) in out.chunks_exact_mut(head_dim).enumerate() {
            axpy(scores[j * len + p], widened, o);
        }
    }
}

#[inline(always)]
fn widen_into<T: PoolElement>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.widen();
    }
}

/// Dot product with 16 independent partial sums, so that it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    reduce(acc) + tail
}

const LANES: usize = 16;

/// Sums 16 lanes pairwise (a short dependency chain, unlike a left fold).
#[inline(always)]
fn reduce(acc: [f32; LANES]) -> f32 {
    let mut v = acc;
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

/// Sum of a slice with 16 partial sums.
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    reduce(acc) + tail
}

/// `e^x` for `x <= 0` (softmax after subtracting the maximum), branch-free so that it
/// vectorises: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by its Taylor series to
/// degree 7 (relative error below 2e-7), `2^n` through the exponent bits. Inputs below
/// -87 give about 1.6e-38 instead of a denormal or zero.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    p * scale
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += alpha * xi;
    }
}

#[inline(always)]
fn softmax_in_place(s: &mut [f32]) {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for x in s.iter_mut() {
        *x = exp_nonpositive(*x - max);
    }
    let inv = 1.0 / sum(s);
    for x in s.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The kernel against libtorch's own attention on gathered keys and values, with
    /// 1 to 9 query heads per KV head (past the groups the AVX-512 kernel specialises)
    /// and head sizes it takes and one it does not.
    fn check(kind: Kind, tolerance: f64) {
        for (heads, kv_heads) in [(6, 2), (4, 4), (9, 1)] {
            for head_dim in [24, 64, 128] {
                for implementation in [Implementation::Best, Implementation::Portable] {
                    let shape = (heads, kv_heads, head_dim);
                    check_one(kind, tolerance, shape, implementation);
                }
            }
        }
    }

    fn check_one(
        kind: Kind,
        tolerance: f64,
        (heads, kv_heads, head_dim): (i64, i64, i64),
        implementation: Implementation,
    ) {
        tch::manual_seed(7);
        let pool = 80i64;
        let k_pool = Tensor::randn([pool, kv_heads, head_dim], (Kind::Float, Device::Cpu));
        let v_pool = Tensor::randn([pool, kv_heads, head_dim], (Kind::Float, Device::Cpu));
        // Lengths below, at and past one 16-lane vector; scattered, distinct slots.
        let lens = [1usize, 5, 17, 38];
        let mut contexts = DecodeContexts::new();
        let mut per_seq = Vec::new();
        for (first, &len) in (3i64..).zip(&lens) {
            let slots: Vec<i64> = (0..len as i64).map(|p| (first + p * 2) % pool).collect();
            contexts.push(slots.iter().copied());
            per_seq.push(slots);
        }
        let q = Tensor::randn(
            [lens.len() as i64, heads, head_dim],
            (Kind::Float, Device::Cpu),
        );
        let got = attend_with(
            &contexts,
            &q.to_kind(kind),
            &k_pool.to_kind(kind),
            &v_pool.to_kind(kind),
            implementation,
        )
        .unwrap()
        .to_kind(Kind::Float);
        for (i, slots) in per_seq.iter().enumerate() {
            let index = Tensor::from_slice(slots);
            let k = k_pool
                .to_kind(kind)
                .to_kind(Kind::Float)
                .index_select(0, &index);
            let v = v_pool
                .to_kind(kind)
                .to_kind(Kind::Float)
                .index_select(0, &index);
            let want = Tensor::scaled_dot_product_attention::<Tensor>(
                &q.to_kind(kind)
                    .to_kind(Kind::Float)
                    .get(i as i64)
                    .reshape([1, heads, 1, head_dim]),
                &k.transpose(0, 1).unsqueeze(0),
                &v.transpose(0, 1).unsqueeze(0),
                None,
                0.0,
                false,
                None,
                true,
            )
            .reshape([heads * head_dim]);
            let diff = (got.get(i as i64) - want).abs().max().double_value(&[]);
            assert!(
                diff < tolerance,
                "{kind:?} {implementation:?} head_dim {head_dim} sequence {i}: max diff {diff}"
            );
        }
    }

    #[test]
    fn matches_libtorch_attention_in_f32() {
        check(Kind::Float, 1e-5);
    }

    #[test]
    fn matches_libtorch_attention_in_bf16_and_f16() {
        check(Kind::BFloat16, 2e-2);
        check(Kind::Half, 5e-3);
    }

    #[test]
    fn exp_is_accurate_on_the_softmax_range() {
        for i in 0..=17_400 {
            let x = -(i as f32) * 0.005;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 3e-7 * want + 1e-38,
                "exp({x}) = {got}, want {want}"
            );
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(-1000.0) < 1e-37);
    }

    #[test]
    fn bad_slots_and_shapes_are_errors() {
        let pool = Tensor::zeros([4, 1, 8], (Kind::Float, Device::Cpu));
        let q = Tensor::zeros([1, 2, 8], (Kind::Float, Device::Cpu));
        let mut contexts = DecodeContexts::new();
        contexts.push([0, 9]);
        assert!(attend(&contexts, &q, &pool, &pool).is_err());
        let mut two = DecodeContexts::new();
        two.push([0]);
        two.push([1]);
        assert!(attend(&two, &q, &pool, &pool).is_err());
    }

    /// Prints the kernel's time on one layer of the default model's shapes at batch 32,
    /// contexts of 144 and 576 tokens, with the KV bytes it reads per second
    /// (`cargo test --release -p tessera-shard --lib cpu_attention::tests::timing --
    /// --ignored --nocapture`); figures, not a check.
    #[test]
    #[ignore]
    fn timing() {
        let (heads, kv_heads, head_dim, batch) = (9i64, 3i64, 64i64, 32usize);
        let layers = 30usize;
        let opts = (Kind::BFloat16, Device::Cpu);
        for len in [144usize, 576] {
            let pool = (batch * len) as i64;
            let pools: Vec<(Tensor, Tensor)> = (0..layers)
                .map(|_| {
                    (
                        Tensor::randn([pool, kv_heads, head_dim], opts),
                        Tensor::randn([pool, kv_heads, head_dim], opts),
                    )
                })
                .collect();
            let mut contexts = DecodeContexts::new();
            for b in 0..batch {
                contexts.push((0..len).map(|p| (b * len + p) as i64));
            }
            let q = Tensor::randn([batch as i64, heads, head_dim], opts);
            let mut times = Vec::new();
            for _ in 0..20 {
                let start = std::time::Instant::now();
                for (k, v) in &pools {
                    let _ = attend(&contexts, &q, k, v).unwrap();
                }
                times.push(start.elapsed().as_secs_f64() * 1e3 / layers as f64);
            }
            times.sort_by(f64::total_cmp);
            let ms = times[times.len() / 2];
            let bytes = 2.0 * (batch * len) as f64 * (kv_heads * head_dim) as f64 * 2.0;
            println!(
                "decode attention, batch {batch}, context {len}, bf16: median {ms:.3} ms per layer, {:.1} GB/s of KV",
                bytes / ms / 1e6
            );
        }
    }
}
