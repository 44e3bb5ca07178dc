//! bf16 and f32 linear layers on weights that oneDNN packs once at load (the C++ shim in
//! `csrc/packed_linear.cpp`, over the CPU wheel's `mkldnn::_reorder_linear_weight` and
//! `mkldnn::_linear_pointwise`).
//!
//! `Tensor::linear` on a plain bf16 weight makes oneDNN re-lay the whole weight out for
//! its AMX/AVX-512 kernels inside every call, so a decode step of 32 rows spends more
//! time copying weights than multiplying them; a plain f32 weight goes to the BLAS, which
//! packs its panels in every call as well. A packed weight skips that copy; it replaces
//! the plain one (same size), so memory does not grow. Results equal the plain product up
//! to the order of the f32 accumulation (one bf16 rounding step at most in bf16, a few
//! units in the last place in f32).

use std::os::raw::{c_char, c_int};

use tch::{Device, Kind, Tensor};

use crate::error::{EngineError, Result};

/// An `at::Tensor*`, as tch hands it over.
type TensorPtr = *mut std::ffi::c_void;

const ERR_LEN: usize = 512;

/// The row count the weights are packed for; measured on this project's CPU machine,
/// weights packed for 32 rows run as fast as or faster than plain ones from 1 to 1,024
/// rows.
const PACK_ROWS: i64 = 32;

extern "C" {
    fn tessera_pack_linear_weight(
        weight: TensorPtr,
        batch: i64,
        out: *mut TensorPtr,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn tessera_packed_linear(
        x: TensorPtr,
        packed: TensorPtr,
        out: *mut TensorPtr,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
}

/// A `[out, in]` weight in oneDNN's packed layout.
pub struct PackedWeight {
    packed: Tensor,
}

/// Whether `weight` can be packed: bf16 or f32 on the CPU, 2-D.
pub fn supports(weight: &Tensor) -> bool {
    weight.device() == Device::Cpu
        && matches!(weight.kind(), Kind::BFloat16 | Kind::Float)
        && weight.dim() == 2
}

/// Runs one shim call that returns a new tensor through its `out` argument.
fn new_tensor(
    what: &str,
    f: impl FnOnce(&mut TensorPtr, *mut c_char, usize) -> c_int,
) -> Result<Tensor> {
    let mut err = [0u8; ERR_LEN];
    let mut out: TensorPtr = std::ptr::null_mut();
    let status = f(&mut out, err.as_mut_ptr().cast(), ERR_LEN);
    if status != 0 || out.is_null() {
        let end = err.iter().position(|&b| b == 0).unwrap_or(ERR_LEN);
        let message = String::from_utf8_lossy(&err[..end]);
        return Err(EngineError::PackedLinear(format!("{what}: {message}")));
    }
    // SAFETY: on success the shim stored a new heap tensor in `out`, whose ownership
    // passes to the `Tensor` built here.
    Ok(unsafe { Tensor::from_ptr(out.cast()) })
}

impl PackedWeight {
    /// Packs `weight` (see [`supports`]).
    pub fn pack(weight: &Tensor) -> Result<Self> {
        if !supports(weight) {
            return Err(EngineError::PackedLinear(format!(
                "packing needs a 2-D bf16 or f32 CPU weight, not {:?} on {:?}",
                weight.kind(),
                weight.device()
            )));
        }
        let mut weight = weight.f_contiguous()?;
        let w = weight.as_mut_ptr().cast();
        // SAFETY: `w` is alive for the call; the shim writes `out` only on success.
        let packed = new_tensor("packing a linear weight", |out, err, len| unsafe {
            tessera_pack_linear_weight(w, PACK_ROWS, out, err, len)
        })?;
        let packed = Self { packed };
        // Some processors can pack but not multiply in bf16: one row is tried here, so
        // that such a weight stays plain instead of failing every request later.
        let probe = Tensor::f_zeros([1, weight.size()[1]], (weight.kind(), Device::Cpu))?;
        let _ = packed.forward(&probe)?;
        Ok(packed)
    }

    /// `x @ weight^T` for a `[rows, in]` input of the weight's dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.f_contiguous()?;
        let mut packed = self.packed.shallow_clone();
        let (xp, wp) = (x.as_mut_ptr().cast(), packed.as_mut_ptr().cast());
        // SAFETY: both tensors are alive for the call; the shim writes `out` only on
        // success.
        new_tensor("packed linear", |out, err, len| unsafe {
            tessera_packed_linear(xp, wp, out, err, len)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packs `w`, or, on a CPU oneDNN has no bf16 path for (AVX2 only), checks that
    /// packing is refused with oneDNN's reason (layers then keep their plain weight).
    fn pack_here(w: &Tensor) -> Option<PackedWeight> {
        if crate::device::cpu_computes_bf16() {
            return Some(PackedWeight::pack(w).unwrap());
        }
        let err = PackedWeight::pack(w).err().map(|e| e.to_string());
        assert!(
            err.as_deref().unwrap_or_default().contains("cpu support"),
            "{err:?}"
        );
        None
    }

    #[test]
    fn packed_product_matches_the_plain_one() {
        tch::manual_seed(11);
        let opts = (Kind::Float, Device::Cpu);
        let w = (Tensor::randn([300, 96], opts) * 0.1).to_kind(Kind::BFloat16);
        let Some(packed) = pack_here(&w) else {
            return;
        };
        for rows in [1i64, 5, 32, 77] {
            let x = Tensor::randn([rows, 96], opts).to_kind(Kind::BFloat16);
            let want = x.linear::<Tensor>(&w, None).to_kind(Kind::Float);
            let got = packed.forward(&x).unwrap();
            assert_eq!(got.size(), vec![rows, 300]);
            assert_eq!(got.kind(), Kind::BFloat16);
            let got = got.to_kind(Kind::Float);
            // At most one bf16 step apart (accumulation order only).
            let tol = want.abs() * (1.0 / 128.0) + 1e-3;
            let worse = (got - &want).abs().gt_tensor(&tol).sum(Kind::Int64);
            assert_eq!(worse.int64_value(&[]), 0, "rows {rows}");
        }
    }

    /// f32 packing works on every x86 CPU oneDNN supports (AVX2 included).
    #[test]
    fn packed_f32_product_matches_the_plain_one() {
        tch::manual_seed(12);
        let opts = (Kind::Float, Device::Cpu);
        let w = Tensor::randn([300, 96], opts) * 0.1;
        let packed = PackedWeight::pack(&w).unwrap();
        for rows in [1i64, 5, 32, 77, 600] {
            let x = Tensor::randn([rows, 96], opts);
            let want = x.linear::<Tensor>(&w, None);
            let got = packed.forward(&x).unwrap();
            assert_eq!(got.size(), vec![rows, 300]);
            assert_eq!(got.kind(), Kind::Float);
            // Sums of 96 products in another order: a few units in the last place.
            let tol = want.abs() * 1e-5 + 1e-5;
            let worse = (got - &want).abs().gt_tensor(&tol).sum(Kind::Int64);
            assert_eq!(worse.int64_value(&[]), 0, "rows {rows}");
        }
    }

    #[test]
    fn a_weight_of_another_dtype_is_refused_with_a_reason() {
        let w = Tensor::zeros([4, 4], (Kind::Half, Device::Cpu));
        assert!(!supports(&w));
        let err = PackedWeight::pack(&w).err().map(|e| e.to_string());
        assert!(err.unwrap_or_default().contains("bf16 or f32"));
    }

    /// f32 weights packed by oneDNN against plain f32 `linear` (the BLAS), SmolLM2's shapes:
    /// `cargo test --release -p tessera-shard --lib packed_linear::tests::f32_timing --
    /// --ignored --nocapture`.
    #[test]
    #[ignore]
    fn f32_timing() {
        let opts = (Kind::Float, Device::Cpu);
        let median = |f: &dyn Fn()| {
            for _ in 0..3 {
                f();
            }
            let mut t: Vec<f64> = (0..21)
                .map(|_| {
                    let s = std::time::Instant::now();
                    f();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[t.len() / 2]
        };
        for (o, i) in [
            (960i64, 576i64),
            (576, 576),
            (3072, 576),
            (576, 1536),
            (49152, 576),
        ] {
            let w = Tensor::randn([o, i], opts) * 0.05;
            let packed = PackedWeight::pack(&w).unwrap();
            for m in [1i64, 8, 32, 128, 512] {
                let x = Tensor::randn([m, i], opts);
                let plain = median(&|| {
                    let _ = x.linear::<Tensor>(&w, None);
                });
                let pk = median(&|| {
                    let _ = packed.forward(&x).unwrap();
                });
                let diff = (x.linear::<Tensor>(&w, None) - packed.forward(&x).unwrap())
                    .abs()
                    .max()
                    .double_value(&[]);
                println!(
                    "{o}x{i} m={m}: plain {plain:.3} ms, packed {pk:.3} ms, max diff {diff:.1e}"
                );
            }
        }
    }

    #[test]
    fn a_wrong_input_width_is_an_error_not_a_crash() {
        let w = Tensor::zeros([8, 64], (Kind::BFloat16, Device::Cpu));
        let Some(packed) = pack_here(&w) else {
            return;
        };
        let x = Tensor::zeros([2, 32], (Kind::BFloat16, Device::Cpu));
        assert!(packed.forward(&x).is_err());
    }
}
