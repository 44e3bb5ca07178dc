//! RMSNorm on the CPU in one pass per row.
//!
//! libtorch 2.11 computes `rms_norm` on the CPU as a chain of operators (square, mean,
//! add, reciprocal square root, two products, and dtype conversions in bf16), each a
//! dispatch and a pass over the data; a decode step runs two norms per layer, so at
//! small batches their overhead adds up to milliseconds per token. This kernel reads
//! each row once to sum its squares in f32 and once to write the result, with the same
//! rounding as Hugging Face's `LlamaRMSNorm`: the normalized row is rounded to the
//! input's dtype before it is multiplied by the weight.

use half::{bf16, f16};

use crate::element::Element;
use tch::{Kind, Tensor};

use crate::error::{EngineError, Result};
use crate::parallel;

/// Rows per task when a norm is spread over libtorch's threads.
const ROWS_PER_TASK: usize = 64;

/// Whether [`rms_norm`] handles `x` (2-D, on the CPU, f32/bf16/f16).
pub fn supports(x: &Tensor) -> bool {
    x.device() == tch::Device::Cpu
        && x.dim() == 2
        && matches!(x.kind(), Kind::Float | Kind::BFloat16 | Kind::Half)
}

/// `x * rsqrt(mean(x²) + eps) * weight` over the last dimension of `x` (`[rows, h]`);
/// `weight` is `[h]` of `x`'s kind. The result is a new tensor of `x`'s kind.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let &[rows, h] = &x.size()[..] else {
        return Err(norm_error(format!("input {:?} must be 2-D", x.size())));
    };
    if weight.size() != [h] || weight.kind() != x.kind() || weight.device() != x.device() {
        return Err(norm_error(format!(
            "weight {:?} of {:?} does not match input {:?} of {:?}",
            weight.size(),
            weight.kind(),
            x.size(),
            x.kind()
        )));
    }
    let x = x.f_contiguous()?;
    let weight = weight.f_contiguous()?;
    let out = Tensor::f_empty([rows, h], (x.kind(), tch::Device::Cpu))?;
    let (rows, h) = (rows as usize, h as usize);
    match x.kind() {
        Kind::Float => run::<f32>(&x, &weight, &out, rows, h, eps as f32)?,
        Kind::BFloat16 => run::<bf16>(&x, &weight, &out, rows, h, eps as f32)?,
        Kind::Half => run::<f16>(&x, &weight, &out, rows, h, eps as f32)?,
        other => return Err(norm_error(format!("unsupported kind {other:?}"))),
    }
    Ok(out)
}

fn norm_error(message: String) -> EngineError {
    EngineError::Norm(message)
}

/// The output rows, written by several tasks at disjoint rows.
struct Rows<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: each task writes only its own rows (see `run`), and nothing reads them meanwhile.
unsafe impl<T: Send> Sync for Rows<T> {}

impl<T> Rows<T> {
    /// Row `r` of `h` elements, `None` out of bounds.
    ///
    /// # Safety
    /// No two live borrows may be of the same row.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, r: usize, h: usize) -> Option<&mut [T]> {
        let (start, end) = (r * h, (r + 1) * h);
        (end <= self.len).then(|| std::slice::from_raw_parts_mut(self.ptr.add(start), h))
    }
}

fn run<T: Element>(
    x: &Tensor,
    weight: &Tensor,
    out: &Tensor,
    rows: usize,
    h: usize,
    eps: f32,
) -> Result<()> {
    let x = slice::<T>(x, rows * h)?;
    let weight: Vec<f32> = slice::<T>(weight, h)?.iter().map(|w| w.widen()).collect();
    let target = Rows {
        ptr: out.data_ptr() as *mut T,
        len: rows * h,
    };
    if out.numel() != rows * h || (rows * h > 0 && target.ptr.is_null()) {
        return Err(norm_error("output storage is not addressable".into()));
    }
    parallel::for_each_span(rows, ROWS_PER_TASK, &|span| {
        norm_rows_best(x, &weight, eps, span, h, &target)
    })
    .map_err(|e| norm_error(e.to_string()))
}

// Normalizes rows `span` into `target`, compiled for AVX-512 where available.
crate::avx512_variant!(fn norm_rows_best<T: Element>(x: &[T], weight: &[f32], eps: f32, span: std::ops::Range<usize>, h: usize, target: &Rows<T>) = norm_rows);

#[inline(always)]
fn norm_rows<T: Element>(
    x: &[T],
    weight: &[f32],
    eps: f32,
    span: std::ops::Range<usize>,
    h: usize,
    target: &Rows<T>,
) {
    for r in span {
        // SAFETY: rows `span` belong to this caller alone (see `run`), and the output
        // outlives the call.
        let Some(dst) = (unsafe { target.row(r, h) }) else {
            return;
        };
        normalize_row(&x[r * h..(r + 1) * h], weight, eps, dst);
    }
}

#[inline(always)]
fn normalize_row<T: Element>(row: &[T], weight: &[f32], eps: f32, out: &mut [T]) {
    // Sixteen partial sums, so that the loop vectorizes.
    let mut partial = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for (p, v) in partial.iter_mut().zip(chunk) {
            let v = v.widen();
            *p += v * v;
        }
    }
    let mut sum: f32 = chunks
        .remainder()
        .iter()
        .map(|v| v.widen() * v.widen())
        .sum();
    sum += partial.iter().sum::<f32>();
    let scale = 1.0 / (sum / row.len().max(1) as f32 + eps).sqrt();
    for ((o, v), w) in out.iter_mut().zip(row).zip(weight) {
        let normalized = T::narrow(v.widen() * scale).widen();
        *o = T::narrow(normalized * w);
    }
}

/// Borrows a contiguous CPU tensor of `len` elements of `T` (whose kind the caller checked).
fn slice<T>(t: &Tensor, len: usize) -> Result<&[T]> {
    if t.numel() != len {
        return Err(norm_error(format!(
            "expected {len} elements, found {}",
            t.numel()
        )));
    }
    if len == 0 {
        return Ok(&[]);
    }
    let ptr = t.data_ptr() as *const T;
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(norm_error("input storage is not addressable".into()));
    }
    // SAFETY: the tensor is contiguous, on the CPU, holds `len` elements of `T` (the
    // caller matched its kind), and the borrow of `t` keeps its storage alive.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        // Hugging Face's LlamaRMSNorm, step by step.
        let h = x.to_kind(Kind::Float);
        let var = h
            .pow_tensor_scalar(2)
            .mean_dim([-1i64].as_slice(), true, Kind::Float);
        let h = h * (var + eps).rsqrt();
        w * h.to_kind(x.kind())
    }

    #[test]
    fn matches_the_step_by_step_norm() {
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            for (rows, h) in [(1, 576), (3, 40), (130, 64), (2, 7)] {
                let x =
                    (Tensor::randn([rows, h], (Kind::Float, tch::Device::Cpu)) * 3.0).to_kind(kind);
                let w = Tensor::randn([h], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
                let got = rms_norm(&x, &w, 1e-5).unwrap();
                let want = reference(&x, &w, 1e-5);
                assert_eq!(got.kind(), kind);
                // At most one unit in the last place apart (the f32 sums may be added in
                // another order, which can move a rounding).
                let ulp = match kind {
                    Kind::Float => 1e-6,
                    Kind::BFloat16 => 1.0 / 128.0,
                    _ => 1.0 / 1024.0,
                };
                let want = want.to_kind(Kind::Float);
                let excess = ((got.to_kind(Kind::Float) - &want).abs() - want.abs() * ulp * 1.01)
                    .max()
                    .double_value(&[]);
                assert!(excess <= 1e-6, "{kind:?} [{rows}, {h}]: {excess}");
            }
        }
    }

    #[test]
    fn mismatched_weight_is_an_error() {
        let x = Tensor::ones([2, 8], (Kind::Float, tch::Device::Cpu));
        let w = Tensor::ones([4], (Kind::Float, tch::Device::Cpu));
        assert!(rms_norm(&x, &w, 1e-5).is_err());
        let w = Tensor::ones([8], (Kind::BFloat16, tch::Device::Cpu));
        assert!(rms_norm(&x, &w, 1e-5).is_err());
    }
}
