//! The MLP's gated activation, `silu(gate) * up`, in one pass on the CPU.
//!
//! In operator form this is two libtorch calls per layer (SiLU, then the product), each
//! with its own intermediate tensor and thread fork. This kernel reads each row of the
//! fused gate/up projection once and writes the activation, rounding as the operator
//! form does in reduced precision: `silu(gate)` is rounded to the model's dtype before
//! it is multiplied by `up`. It is used for bf16 and f16 only; f32 keeps libtorch's
//! operators, whose exponential the f32 reference checks were made with.

use half::{bf16, f16};
use tch::{Kind, Tensor};

use crate::element::Element;
use crate::error::{EngineError, Result};
use crate::parallel;
use crate::sampling::exp_nonpos;

/// Rows per task when the activation is spread over libtorch's threads.
const ROWS_PER_TASK: usize = 16;

/// Whether [`silu_mul`] handles `gate_up` (2-D, bf16 or f16, on the CPU).
pub fn supports(gate_up: &Tensor) -> bool {
    gate_up.device() == tch::Device::Cpu
        && gate_up.dim() == 2
        && matches!(gate_up.kind(), Kind::BFloat16 | Kind::Half)
}

/// `silu(gate_up[:, :inter]) * gate_up[:, inter:]` for `gate_up` of `[rows, 2 * inter]`;
/// a new `[rows, inter]` tensor of the same kind.
pub fn silu_mul(gate_up: &Tensor, inter: usize) -> Result<Tensor> {
    let &[rows, width] = &gate_up.size()[..] else {
        return Err(mlp_error(format!(
            "gate/up {:?} must be 2-D",
            gate_up.size()
        )));
    };
    if width as usize != 2 * inter || !supports(gate_up) {
        return Err(mlp_error(format!(
            "gate/up {:?} of {:?} is not [rows, 2 x {inter}] bf16/f16 on the CPU",
            gate_up.size(),
            gate_up.kind()
        )));
    }
    let input = gate_up.f_contiguous()?;
    let out = Tensor::f_empty([rows, inter as i64], (input.kind(), tch::Device::Cpu))?;
    let rows = rows as usize;
    match input.kind() {
        Kind::BFloat16 => run::<bf16>(&input, &out, rows, inter)?,
        _ => run::<f16>(&input, &out, rows, inter)?,
    }
    Ok(out)
}

fn mlp_error(message: String) -> EngineError {
    EngineError::Activation(message)
}

fn run<T: Element>(input: &Tensor, out: &Tensor, rows: usize, inter: usize) -> Result<()> {
    let (src, dst) = (input.data_ptr() as usize, out.data_ptr() as usize);
    if rows * inter > 0 && (src == 0 || dst == 0) {
        return Err(mlp_error("storage is not addressable".into()));
    }
    let task = |span: std::ops::Range<usize>| {
        for r in span {
            // SAFETY: `input` is a contiguous `[rows, 2 * inter]` tensor of `T` and `out`
            // a fresh `[rows, inter]` one (checked in `silu_mul`), both alive until `run`
            // returns; `r < rows`, and each row of `out` is written by one task only.
            let (row, target) = unsafe {
                (
                    std::slice::from_raw_parts((src as *const T).add(r * 2 * inter), 2 * inter),
                    std::slice::from_raw_parts_mut((dst as *mut T).add(r * inter), inter),
                )
            };
            let (gate, up) = row.split_at(inter);
            silu_mul_row_best(gate, up, target);
        }
    };
    parallel::for_each_span(rows, ROWS_PER_TASK, &task).map_err(|e| mlp_error(e.to_string()))
}

// One row, compiled for AVX-512 where available.
crate::avx512_variant!(fn silu_mul_row_best<T: Element>(gate: &[T], up: &[T], out: &mut [T]) = silu_mul_row);

#[inline(always)]
fn silu_mul_row<T: Element>(gate: &[T], up: &[T], out: &mut [T]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let act = T::rounded(silu(g.widen()));
        *o = T::narrow(act * u.widen());
    }
}

/// `x * sigmoid(x)`, with the exponential taken of `-|x|` only (never overflows).
#[inline(always)]
fn silu(x: f32) -> f32 {
    let e = exp_nonpos(-x.abs());
    let sigmoid = if x >= 0.0 {
        1.0 / (1.0 + e)
    } else {
        e / (1.0 + e)
    };
    x * sigmoid
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn matches_the_operator_form_within_one_rounding() {
        for kind in [Kind::BFloat16, Kind::Half] {
            for rows in [1i64, 3, 40] {
                let inter = 96i64;
                let x = (Tensor::randn([rows, 2 * inter], (Kind::Float, Device::Cpu)) * 4.0)
                    .to_kind(kind);
                let got = silu_mul(&x, inter as usize).unwrap();
                assert_eq!(got.size(), vec![rows, inter]);
                assert_eq!(got.kind(), kind);
                let want = x
                    .narrow(1, 0, inter)
                    .silu()
                    .f_mul(&x.narrow(1, inter, inter))
                    .unwrap()
                    .to_kind(Kind::Float);
                let ulp = if kind == Kind::BFloat16 {
                    1.0 / 128.0
                } else {
                    1.0 / 1024.0
                };
                // One unit in the last place of each of the two roundings, at most.
                let excess =
                    ((got.to_kind(Kind::Float) - &want).abs() - want.abs() * (2.02 * ulp) - 1e-6)
                        .max()
                        .double_value(&[]);
                assert!(excess <= 0.0, "{kind:?} rows {rows}: {excess}");
            }
        }
    }

    #[test]
    fn extreme_inputs_stay_finite() {
        let x = Tensor::from_slice(&[-1000.0f32, 1000.0, 0.0, -20.0, 3.0, 4.0, 5.0, 6.0])
            .view([1, 8])
            .to_kind(Kind::BFloat16);
        let got =
            Vec::<f32>::try_from(silu_mul(&x, 4).unwrap().to_kind(Kind::Float).view([-1])).unwrap();
        assert_eq!(got[0], 0.0);
        assert_eq!(got[2], 0.0);
        assert!((got[1] - 1000.0 * 4.0).abs() <= 32.0, "{got:?}");
        assert!(got.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn wrong_shapes_and_kinds_are_errors() {
        let x = Tensor::zeros([2, 6], (Kind::BFloat16, Device::Cpu));
        assert!(silu_mul(&x, 4).is_err());
        let x = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        assert!(silu_mul(&x, 4).is_err());
    }
}
