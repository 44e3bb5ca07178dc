//! Linear layers with an optional compressed copy for small batches on the CPU.
//!
//! Decoding a handful of sequences reads every weight once per token, so it is bound
//! by memory traffic. For GGUF weights stored as Q4_0/Q4_1 the engine keeps, besides
//! the dense weight, a lossless int4 group-wise copy (groups of 32 with a scale and a
//! zero point each, which is exactly Q4_0/Q4_1's format: for `quant_matmul`'s AVX2
//! kernel on processors without AVX-512 VNNI, for libtorch's
//! `_weight_int4pack_mm_for_cpu` elsewhere) and for the output head an int8 copy;
//! steps with at most [`SMALL_BATCH_ROWS`] rows ([`Q4_KERNEL_ROWS`] for the AVX2 kernel)
//! use them, larger steps use the dense weight, whose matmuls are faster once the weight
//! read is amortised. A dense bf16 or f32 weight on the CPU is kept packed for oneDNN
//! (see `packed_linear`).

use half::f16;
use tch::{Kind, Tensor};

use crate::error::{EngineError, Result};
use crate::packed_linear::{self, PackedWeight};
use crate::quant_matmul::{self, QuantWeight};

/// Steps of up to this many token rows use the compressed weights.
pub const SMALL_BATCH_ROWS: i64 = 8;

/// Steps of up to this many rows use `quant_matmul`'s 4-bit AVX2 kernel; larger ones the
/// dense f32 weight packed for oneDNN. Measured on this project's AVX2 machine
/// (`quant_matmul::tests::crossover_timing`, SmolLM2's projections): the two take the
/// same time at 4 rows, the kernel is 1.3-1.8x faster below, the packed weight 1.3-2x
/// faster from 6 rows on.
pub const Q4_KERNEL_ROWS: i64 = 4;

/// Steps of up to this many rows use the output head's integer (VNNI) copy, with f32
/// logits; larger ones the dense weight, which libtorch multiplies faster from about 32
/// rows on (measured on this project's CPU machine, see the README).
pub const QUANT_HEAD_ROWS: i64 = 16;

/// Elements per int4 group (Q4_0/Q4_1 blocks hold 32).
pub const INT4_GROUP: usize = 32;

/// Quantization codes of a `[rows, cols]` weight: `w = (code - 8) * scale + zero`
/// per group of [`INT4_GROUP`] columns.
#[derive(Clone)]
pub struct Int4Codes {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols` codes in 0..16.
    pub codes: Vec<i32>,
    /// `rows * cols / INT4_GROUP` scales and zeros, row-major.
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
}

impl Int4Codes {
    /// Reads Q4_0 (`ggml` type 2) or Q4_1 (type 3) blocks; `None` for other types.
    pub fn from_ggml_blocks(q4_1: bool, bytes: &[u8], rows: usize, cols: usize) -> Option<Self> {
        let block_bytes = if q4_1 { 20 } else { 18 };
        let groups = rows * cols / INT4_GROUP;
        if !cols.is_multiple_of(INT4_GROUP) || bytes.len() != groups * block_bytes {
            return None;
        }
        let mut codes = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(groups);
        let mut zeros = Vec::with_capacity(groups);
        for block in bytes.chunks_exact(block_bytes) {
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let (zero, qs) = if q4_1 {
                let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                // q * d + m == (q - 8) * d + (m + 8 d)
                (m + 8.0 * d, &block[4..20])
            } else {
                (0.0, &block[2..18])
            };
            scales.push(d);
            zeros.push(zero);
            codes.extend(qs.iter().map(|b| (b & 0x0f) as i32));
            codes.extend(qs.iter().map(|b| (b >> 4) as i32));
        }
        Some(Self {
            rows,
            cols,
            codes,
            scales,
            zeros,
        })
    }

    /// Reorders rows: row `r` of the result is row `order[r]` of `self`.
    pub fn permute_rows(self, order: &[usize]) -> Self {
        let groups = self.cols / INT4_GROUP;
        let mut codes = Vec::with_capacity(self.codes.len());
        let mut scales = Vec::with_capacity(self.scales.len());
        let mut zeros = Vec::with_capacity(self.zeros.len());
        for &r in order {
            codes.extend_from_slice(&self.codes[r * self.cols..(r + 1) * self.cols]);
            scales.extend_from_slice(&self.scales[r * groups..(r + 1) * groups]);
            zeros.extend_from_slice(&self.zeros[r * groups..(r + 1) * groups]);
        }
        Self {
            codes,
            scales,
            zeros,
            ..self
        }
    }

    /// Keeps rows `start..start + len` (a column-parallel rank's part).
    pub fn select_rows(self, start: usize, len: usize) -> Option<Self> {
        if start + len > self.rows {
            return None;
        }
        let order: Vec<usize> = (start..start + len).collect();
        Some(Self {
            rows: len,
            ..self.permute_rows(&order)
        })
    }

    /// Keeps columns `start..start + len` (a row-parallel rank's part); `None` unless
    /// both are whole groups.
    pub fn select_cols(self, start: usize, len: usize) -> Option<Self> {
        if !start.is_multiple_of(INT4_GROUP)
            || !len.is_multiple_of(INT4_GROUP)
            || len == 0
            || start + len > self.cols
        {
            return None;
        }
        let (groups, first, count) = (self.cols / INT4_GROUP, start / INT4_GROUP, len / INT4_GROUP);
        let mut codes = Vec::with_capacity(self.rows * len);
        let mut scales = Vec::with_capacity(self.rows * count);
        let mut zeros = Vec::with_capacity(self.rows * count);
        for r in 0..self.rows {
            codes
                .extend_from_slice(&self.codes[r * self.cols + start..r * self.cols + start + len]);
            scales.extend_from_slice(&self.scales[r * groups + first..r * groups + first + count]);
            zeros.extend_from_slice(&self.zeros[r * groups + first..r * groups + first + count]);
        }
        Some(Self {
            rows: self.rows,
            cols: len,
            codes,
            scales,
            zeros,
        })
    }

    /// Stacks weights along the output (row) dimension.
    pub fn concat(parts: Vec<Int4Codes>) -> Option<Self> {
        let cols = parts.first()?.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let mut out = Self {
            rows: 0,
            cols,
            codes: Vec::new(),
            scales: Vec::new(),
            zeros: Vec::new(),
        };
        for p in parts {
            out.rows += p.rows;
            out.codes.extend(p.codes);
            out.scales.extend(p.scales);
            out.zeros.extend(p.zeros);
        }
        Some(out)
    }
}

enum Compressed {
    /// 8-bit or 4-bit codes per block of 32, multiplied in integers with f32 sums (see
    /// `quant_matmul`); used up to [`QUANT_HEAD_ROWS`] rows (8-bit, the output head) or
    /// [`Q4_KERNEL_ROWS`] (4-bit).
    Quant(QuantWeight),
    Int4 {
        packed: Tensor,
        scales_zeros: Tensor,
    },
    Int8 {
        weight: Tensor,
        scales: Tensor,
    },
}

pub struct Linear {
    dense: Tensor,
    /// The dense weight packed for oneDNN (bf16 or f32 on the CPU), used instead of `dense`.
    packed: Option<PackedWeight>,
    compressed: Option<Compressed>,
}

impl Linear {
    pub fn dense(weight: Tensor) -> Self {
        Self {
            dense: weight,
            packed: None,
            compressed: None,
        }
    }

    /// Packs the dense weight for oneDNN where it can (see `packed_linear`); the plain
    /// weight is dropped unless `keep_plain` (for a weight shared with the embedding,
    /// whose memory stays in use anyway). Where packing is not possible, the layer stays
    /// as it was.
    pub fn with_packed(mut self, keep_plain: bool) -> Self {
        if !packed_linear::supports(&self.dense) {
            return self;
        }
        match PackedWeight::pack(&self.dense) {
            Ok(packed) => {
                if !keep_plain {
                    self.dense = Tensor::empty([0], (self.dense.kind(), self.dense.device()));
                }
                self.packed = Some(packed);
            }
            Err(e) => tracing::debug!("linear weight kept plain: {e}"),
        }
        self
    }

    /// Adds the int4 copy made from `codes` (CPU only): for `quant_matmul`'s kernel on
    /// AVX2 processors (see `quant_matmul::q4_preferred`), otherwise for libtorch's int4
    /// kernel, with activations of `kind`.
    pub fn with_int4(mut self, codes: Int4Codes, kind: Kind) -> Result<Self> {
        if quant_matmul::q4_preferred() {
            let weight = QuantWeight::from_q4(
                codes.rows,
                codes.cols,
                &codes.codes,
                &codes.scales,
                &codes.zeros,
            )?;
            self.compressed = Some(Compressed::Quant(weight));
            return Ok(self);
        }
        let (rows, cols) = (codes.rows as i64, codes.cols as i64);
        let groups = cols / INT4_GROUP as i64;
        let packed = Tensor::f_from_slice(&codes.codes)?
            .f_view([rows, cols])?
            .f_internal_convert_weight_to_int4pack_for_cpu(2)?;
        let scales = Tensor::f_from_slice(&codes.scales)?.f_view([rows, groups])?;
        let zeros = Tensor::f_from_slice(&codes.zeros)?.f_view([rows, groups])?;
        let scales_zeros =
            Tensor::f_stack(&[scales.f_transpose(0, 1)?, zeros.f_transpose(0, 1)?], -1)?
                .f_to_kind(kind)?
                .f_contiguous()?;
        self.compressed = Some(Compressed::Int4 {
            packed,
            scales_zeros,
        });
        Ok(self)
    }

    /// Adds an int8 copy (CPU only; for the output head): with AVX-512 VNNI or AVX2, 8-bit
    /// codes per block of 32 for `quant_matmul`, whose f32 results keep the logits precise;
    /// otherwise one scale per output row for libtorch's `_weight_int8pack_mm`. Quantizes
    /// a band of rows at a time so that no full-size f32 copy of the weight is ever made.
    pub fn with_int8(self) -> Result<Self> {
        let kind = self.dense.kind();
        self.with_int8_in(kind)
    }

    /// `with_int8` whose libtorch kernel takes activations of `kind` (bf16 beside f32
    /// weights: see `forward`).
    pub fn with_int8_in(mut self, kind: Kind) -> Result<Self> {
        if quant_matmul::q8_accelerated() {
            self.compressed = Some(Compressed::Quant(QuantWeight::from_dense_q8(&self.dense)?));
            return Ok(self);
        }
        let rows = self.dense.size().first().copied().unwrap_or(0);
        let band = 4096;
        let mut weights = Vec::new();
        let mut scales = Vec::new();
        let mut start = 0;
        while start < rows {
            let len = band.min(rows - start);
            let w = self.dense.f_narrow(0, start, len)?.f_to_kind(Kind::Float)?;
            let scale = w
                .f_abs()?
                .f_amax([1i64].as_slice(), true)?
                .f_clamp_min(1e-12)?
                .f_div_scalar(127.0)?;
            weights.push(w.f_div(&scale)?.f_round()?.f_to_kind(Kind::Int8)?);
            scales.push(scale.f_squeeze_dim(1)?);
            start += len;
        }
        let weight = Tensor::f_cat(&weights, 0)?;
        let scales = Tensor::f_cat(&scales, 0)?.f_to_kind(kind)?;
        self.compressed = Some(Compressed::Int8 { weight, scales });
        Ok(self)
    }

    /// `forward` with an f32 result; the integer kernel produces f32 sums, which keeps
    /// logits more precise than a bf16 result would.
    pub fn forward_f32(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.size().first().copied().unwrap_or(0);
        match &self.compressed {
            Some(Compressed::Quant(weight)) if rows <= quant_rows(weight) => weight.matmul_f32(x),
            _ => Ok(self.forward(x)?.f_to_kind(Kind::Float)?),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rows = x.size().first().copied().unwrap_or(0);
        match &self.compressed {
            Some(Compressed::Quant(weight)) if rows <= quant_rows(weight) => weight.matmul(x),
            Some(Compressed::Int4 {
                packed,
                scales_zeros,
            }) if rows <= SMALL_BATCH_ROWS => in_kind(x, scales_zeros.kind(), |x| {
                x.f_internal_weight_int4pack_mm_for_cpu(packed, INT4_GROUP as i64, scales_zeros)
            }),
            Some(Compressed::Int8 { weight, scales }) if rows <= SMALL_BATCH_ROWS => {
                in_kind(x, scales.kind(), |x| {
                    x.f_internal_weight_int8pack_mm(weight, scales)
                })
            }
            _ => match &self.packed {
                Some(packed) => packed.forward(x),
                None => Ok(x.f_linear::<Tensor>(&self.dense, None)?),
            },
        }
    }
}

/// The most rows a step may have to use `weight` rather than the dense weight.
fn quant_rows(weight: &QuantWeight) -> i64 {
    match weight.bits() {
        quant_matmul::Bits::Eight => QUANT_HEAD_ROWS,
        quant_matmul::Bits::Four => Q4_KERNEL_ROWS,
    }
}

/// Runs `kernel` on `x` converted to `kind` (contiguous), and converts its result back to
/// `x`'s dtype. With f32 weights the compressed copies compute in bf16: libtorch's int4
/// and int8 kernels have vectorized paths for bf16 activations only (with f32 ones they
/// measured 4-25x slower than the dense f32 matmul on an AVX2 CPU).
fn in_kind(
    x: &Tensor,
    kind: Kind,
    kernel: impl FnOnce(&Tensor) -> std::result::Result<Tensor, tch::TchError>,
) -> Result<Tensor> {
    if x.kind() == kind {
        return Ok(kernel(&x.f_contiguous()?)?);
    }
    let y = kernel(&x.f_to_kind(kind)?.f_contiguous()?)?;
    Ok(y.f_to_kind(x.kind())?)
}

/// The row order that undoes llama.cpp's q/k permutation (see `unpermute_qk`).
pub fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    let index: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    let order = tessera_model::gguf::try_unpermute_qk(&index, heads, 1)?;
    order
        .iter()
        .map(|&r| {
            if r >= 0.0 && (r as usize) < rows {
                Ok(r as usize)
            } else {
                Err(EngineError::Quantize(format!(
                    "bad row permutation entry {r}"
                )))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_codes_matches_slicing_the_dense_weight() {
        let (rows, cols) = (4usize, 96usize);
        let c = Int4Codes {
            rows,
            cols,
            codes: (0..rows * cols).map(|i| (i % 16) as i32).collect(),
            scales: (0..rows * cols / 32).map(|i| i as f32 + 1.0).collect(),
            zeros: (0..rows * cols / 32).map(|i| -(i as f32)).collect(),
        };
        let dense = |c: &Int4Codes| -> Vec<f32> {
            (0..c.rows * c.cols)
                .map(|i| {
                    let (r, col) = (i / c.cols, i % c.cols);
                    let g = r * (c.cols / 32) + col / 32;
                    (c.codes[i] - 8) as f32 * c.scales[g] + c.zeros[g]
                })
                .collect()
        };
        let full = dense(&c);
        let cols_part = Int4Codes {
            codes: c.codes.clone(),
            scales: c.scales.clone(),
            zeros: c.zeros.clone(),
            ..c
        }
        .select_cols(32, 64)
        .unwrap();
        let got = dense(&cols_part);
        for r in 0..rows {
            assert_eq!(&got[r * 64..(r + 1) * 64], &full[r * 96 + 32..r * 96 + 96]);
        }
        let rows_part = Int4Codes {
            codes: c.codes.clone(),
            scales: c.scales.clone(),
            zeros: c.zeros.clone(),
            ..c
        }
        .select_rows(1, 2)
        .unwrap();
        assert_eq!(dense(&rows_part), full[96..3 * 96].to_vec());
        assert!(Int4Codes {
            codes: c.codes.clone(),
            scales: c.scales.clone(),
            zeros: c.zeros.clone(),
            ..c
        }
        .select_cols(16, 32)
        .is_none());
    }

    #[test]
    fn q4_1_blocks_become_exact_int4_codes() {
        // d = 0.5, m = -1.0, codes 0..15 then 15..0.
        let mut block = Vec::new();
        block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        for i in 0..16u8 {
            block.push(i | ((15 - i) << 4));
        }
        let c = Int4Codes::from_ggml_blocks(true, &block, 1, 32).unwrap();
        for (i, &q) in c.codes.iter().enumerate() {
            let dequant = q as f32 * 0.5 - 1.0;
            let via_int4 = (q - 8) as f32 * c.scales[0] + c.zeros[0];
            assert_eq!(dequant, via_int4, "element {i}");
        }
        assert_eq!(c.codes[0], 0);
        assert_eq!(c.codes[16], 15);
    }

    #[test]
    fn int4_and_int8_matmuls_match_dense() {
        let rows = 64;
        let cols = 64;
        let codes: Vec<i32> = (0..rows * cols).map(|i| ((i * 7) % 16) as i32).collect();
        let scales: Vec<f32> = (0..rows * cols / 32)
            .map(|i| 0.01 + i as f32 * 1e-4)
            .collect();
        let zeros: Vec<f32> = (0..rows * cols / 32)
            .map(|i| (i as f32 - 50.0) * 1e-3)
            .collect();
        let dense: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let g = i / 32;
                (codes[i] - 8) as f32 * scales[g] + zeros[g]
            })
            .collect();
        let w = Tensor::from_slice(&dense).view([rows as i64, cols as i64]);
        tch::manual_seed(7);
        let x = Tensor::randn([2, cols as i64], (Kind::Float, tch::Device::Cpu));
        // The reference sees the same bf16-rounded inputs, so that only the kernels'
        // own error is measured (not the rounding of the activations).
        let xr = x.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let wr = w.to_kind(Kind::BFloat16).to_kind(Kind::Float);
        let reference = xr.linear::<Tensor>(&wr, None);
        let c = Int4Codes {
            rows,
            cols,
            codes,
            scales,
            zeros,
        };
        let xb = x.to_kind(Kind::BFloat16);
        let int4 = Linear::dense(w.to_kind(Kind::BFloat16))
            .with_int4(c.clone(), Kind::BFloat16)
            .unwrap();
        let y = int4.forward(&xb).unwrap().to_kind(Kind::Float);
        let err = (&y - &reference).abs().max().double_value(&[]);
        let scale = reference.abs().max().double_value(&[]);
        assert!(err / scale < 2e-2, "int4 relative error {}", err / scale);
        let int8 = Linear::dense(w.to_kind(Kind::BFloat16))
            .with_int8()
            .unwrap();
        let y = int8.forward(&xb).unwrap().to_kind(Kind::Float);
        let err = (&y - &reference).abs().max().double_value(&[]);
        assert!(err / scale < 2e-2, "int8 relative error {}", err / scale);

        // f32 weights whose compressed copies compute in bf16 (`--dtype auto` on a CPU
        // without native bf16): f32 in, f32 out, within the same error for small batches;
        // larger batches use the dense f32 weight, exactly.
        let hybrid = Linear::dense(w.shallow_clone())
            .with_int4(c, Kind::BFloat16)
            .unwrap();
        let y = hybrid.forward(&x).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        let err = (&y - &reference).abs().max().double_value(&[]);
        assert!(
            err / scale < 2e-2,
            "f32/bf16 int4 relative error {}",
            err / scale
        );
        let big = Tensor::randn(
            [SMALL_BATCH_ROWS + 1, cols as i64],
            (Kind::Float, tch::Device::Cpu),
        );
        let dense = big.linear::<Tensor>(&w, None);
        assert!(hybrid.forward(&big).unwrap().equal(&dense));
        if quant_matmul::q4_preferred() {
            // The AVX2 kernel stops earlier: above its rows, the dense weight, exactly.
            let mid = Tensor::randn(
                [Q4_KERNEL_ROWS + 1, cols as i64],
                (Kind::Float, tch::Device::Cpu),
            );
            let dense = mid.linear::<Tensor>(&w, None);
            assert!(hybrid.forward(&mid).unwrap().equal(&dense));
        }
        let head = Linear::dense(w.shallow_clone())
            .with_int8_in(Kind::BFloat16)
            .unwrap();
        let y = head.forward(&x).unwrap();
        assert_eq!(y.kind(), Kind::Float);
        let err = (&y - &reference).abs().max().double_value(&[]);
        assert!(
            err / scale < 2e-2,
            "f32/bf16 int8 relative error {}",
            err / scale
        );
    }
}
