//! Rotary position embedding on the CPU, applied in place to the query and key heads.
//!
//! The operator form (`x * cos + rotate_half(x) * sin`) costs five libtorch calls and as
//! many temporaries per layer, plus the cos/sin tables per step; at small decode batches
//! that dispatch outweighs the arithmetic. [`RotaryTable`] builds each step's cos and sin
//! once (in f32, rounded to the model's dtype as the operator form rounds them) and
//! [`RotaryTable::apply`] rotates the heads of the fresh q/k/v projection in place, with
//! the same roundings as the operator form (each product, then the sum).

use half::{bf16, f16};

use crate::element::Element;
use tch::{Kind, Tensor};

use crate::error::{EngineError, Result};

/// cos and sin of every new token's position, `[T, head_dim / 2]` each.
pub struct RotaryTable {
    kind: Kind,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn rotary_error(message: String) -> EngineError {
    EngineError::Rotary(message)
}

/// Rounds `value` to what `kind` can hold (f32 values stay as they are).
fn round_to(kind: Kind, value: f32) -> f32 {
    match kind {
        Kind::BFloat16 => bf16::from_f32(value).to_f32(),
        Kind::Half => f16::from_f32(value).to_f32(),
        _ => value,
    }
}

impl RotaryTable {
    /// Whether tensors of `kind` on `device` are handled.
    pub fn supports(kind: Kind, device: tch::Device) -> bool {
        device == tch::Device::Cpu && matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half)
    }

    /// The table for `positions` (`[T]`, CPU, int64) and the model's inverse frequencies.
    pub fn new(positions: &Tensor, inv_freq: &[f32], kind: Kind) -> Result<Self> {
        let positions = Vec::<i64>::try_from(positions.f_to_kind(Kind::Int64)?)?;
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in &positions {
            for &f in inv_freq {
                // As the operator form: the angle in f32, its cos and sin in f32, then
                // rounded to the model's dtype.
                let angle = p as f32 * f;
                cos.push(round_to(kind, angle.cos()));
                sin.push(round_to(kind, angle.sin()));
            }
        }
        Ok(Self {
            kind,
            half,
            cos,
            sin,
        })
    }

    /// Rotates heads `0..heads` (each `2 * half` wide) of every row of `qkv` (`[T, width]`,
    /// contiguous, of the table's dtype) in place; the rest of each row is left alone.
    pub fn apply(&self, qkv: &mut Tensor, heads: usize) -> Result<()> {
        let &[rows, width] = &qkv.size()[..] else {
            return Err(rotary_error(format!("q/k/v {:?} must be 2-D", qkv.size())));
        };
        let (rows, width) = (rows as usize, width as usize);
        let head_dim = 2 * self.half;
        if qkv.kind() != self.kind
            || qkv.device() != tch::Device::Cpu
            || !qkv.is_contiguous()
            || rows * self.half != self.cos.len()
            || heads * head_dim > width
        {
            return Err(rotary_error(format!(
                "q/k/v {:?} of {:?} does not fit {heads} heads of {head_dim} for {} positions",
                qkv.size(),
                qkv.kind(),
                self.cos.len() / self.half.max(1)
            )));
        }
        match self.kind {
            Kind::Float => self.rotate::<f32>(qkv, rows, width, heads),
            Kind::BFloat16 => self.rotate::<bf16>(qkv, rows, width, heads),
            Kind::Half => self.rotate::<f16>(qkv, rows, width, heads),
            other => Err(rotary_error(format!("unsupported kind {other:?}"))),
        }
    }

    fn rotate<T: Element>(
        &self,
        qkv: &mut Tensor,
        rows: usize,
        width: usize,
        heads: usize,
    ) -> Result<()> {
        let len = rows * width;
        let ptr = qkv.data_ptr() as *mut T;
        if len > 0 && (ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>())) {
            return Err(rotary_error("q/k/v storage is not addressable".into()));
        }
        if len == 0 {
            return Ok(());
        }
        // SAFETY: `qkv` is a contiguous CPU tensor of `len` elements of `T` (checked by
        // `apply`), borrowed mutably for this call, so nothing else reads or writes it.
        let data = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        rotate_rows_best(data, width, heads, self.half, &self.cos, &self.sin);
        Ok(())
    }
}

// Rotates heads `0..heads` of every `width`-wide row of `data` by the per-row angles
// (`half` cos and sin values per row), compiled for AVX-512 where available.
crate::avx512_variant!(fn rotate_rows_best<T: Element>(data: &mut [T], width: usize, heads: usize, half: usize, cos: &[f32], sin: &[f32]) = rotate_rows);

#[inline(always)]
fn rotate_rows<T: Element>(
    data: &mut [T],
    width: usize,
    heads: usize,
    half: usize,
    cos: &[f32],
    sin: &[f32],
) {
    for (r, row) in data.chunks_exact_mut(width).enumerate() {
        let (Some(cos), Some(sin)) = (
            cos.get(r * half..(r + 1) * half),
            sin.get(r * half..(r + 1) * half),
        ) else {
            return;
        };
        for head in row[..heads * 2 * half].chunks_exact_mut(2 * half) {
            let (first, second) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (first[i].widen(), second[i].widen());
                let (c, s) = (cos[i], sin[i]);
                let a = T::rounded(x1 * c) + T::rounded(-x2 * s);
                let b = T::rounded(x2 * c) + T::rounded(x1 * s);
                first[i] = T::narrow(a);
                second[i] = T::narrow(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operator form, as the model ran it before.
    fn operators(x: &Tensor, positions: &Tensor, inv_freq: &[f32], kind: Kind) -> Tensor {
        let inv = Tensor::from_slice(inv_freq);
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv.unsqueeze(0);
        let emb = Tensor::cat(&[&freqs, &freqs], -1).unsqueeze(1);
        let (cos, sin) = (emb.cos().to_kind(kind), emb.sin().to_kind(kind));
        let half = x.size()[2] / 2;
        let x1 = x.narrow(-1, 0, half);
        let x2 = x.narrow(-1, half, half);
        let rotated = Tensor::cat(&[&x2.neg(), &x1], -1);
        x * cos + rotated * sin
    }

    #[test]
    fn matches_the_operator_form() {
        let inv_freq: Vec<f32> = (0..32)
            .map(|i| 1.0 / 10000f32.powf(i as f32 / 32.0))
            .collect();
        let positions = Tensor::from_slice(&[0i64, 1, 7, 130, 2047]);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let (heads, other) = (5usize, 2usize);
            let x = Tensor::randn(
                [5, (heads + other) as i64 * 64],
                (Kind::Float, tch::Device::Cpu),
            )
            .to_kind(kind);
            let mut got = x.copy();
            let table = RotaryTable::new(&positions, &inv_freq, kind).unwrap();
            table.apply(&mut got, heads).unwrap();
            let rotated = x
                .narrow(1, 0, heads as i64 * 64)
                .view([5, heads as i64, 64]);
            let want = operators(&rotated, &positions, &inv_freq, kind).view([5, -1]);
            let got_heads = got.narrow(1, 0, heads as i64 * 64);
            // cos and sin of large angles may differ in their last f32 bit between
            // implementations, which can move one rounding.
            let ulp = match kind {
                Kind::Float => 1e-5,
                Kind::BFloat16 => 2.0 / 128.0,
                _ => 2.0 / 1024.0,
            };
            let want = want.to_kind(Kind::Float);
            let excess = ((got_heads.to_kind(Kind::Float) - &want).abs() - want.abs() * ulp)
                .max()
                .double_value(&[]);
            assert!(excess <= 1e-4, "{kind:?}: {excess}");
            // The value heads are untouched.
            let rest = heads as i64 * 64;
            assert!(got.narrow(1, rest, other as i64 * 64).equal(&x.narrow(
                1,
                rest,
                other as i64 * 64
            )));
        }
    }

    #[test]
    fn a_wrong_shape_is_an_error() {
        let table =
            RotaryTable::new(&Tensor::from_slice(&[0i64, 1]), &[1.0, 0.5], Kind::Float).unwrap();
        let mut wrong_rows = Tensor::zeros([3, 8], (Kind::Float, tch::Device::Cpu));
        assert!(table.apply(&mut wrong_rows, 2).is_err());
        let mut too_narrow = Tensor::zeros([2, 4], (Kind::Float, tch::Device::Cpu));
        assert!(table.apply(&mut too_narrow, 2).is_err());
        let mut wrong_kind = Tensor::zeros([2, 8], (Kind::BFloat16, tch::Device::Cpu));
        assert!(table.apply(&mut wrong_kind, 2).is_err());
    }
}
