//! Weights on the CPU as 8-bit or 4-bit blocks, multiplied in integers with f32 results.
//!
//! A weight is kept as blocks of [`BLOCK`] unsigned codes along each row, with a scale
//! and an offset per block (`w = scale * code + offset`):
//!
//! - 8-bit codes ([`Bits::Eight`], made from a dense weight, for the output head, the
//!   model's largest matrix and the last product of every step): the offset is
//!   `-128 * scale`, i.e. symmetric int8 per block;
//! - 4-bit codes ([`Bits::Four`], taken as they are from a GGUF file's Q4_0/Q4_1 blocks,
//!   for the layers' projections on AVX2 processors): the offset is Q4_1's minimum
//!   (`-8 * scale` for Q4_0), so the copy is lossless.
//!
//! The activations of the step are quantized per block of 32 (one scale per block), to
//! signed 8 bits for the AVX-512 VNNI kernel and to 16 bits elsewhere (see
//! `Activations`), and each block's dot product is summed in 32-bit integers (VNNI's
//! `vpdpbusd`, 64 byte products per instruction, or AVX2's `vpmaddwd`, 16 products of
//! 16-bit values) before its two scales are applied:
//!
//! `y[b, r] = Σ_k scale[r,k] · xscale[b,k] · Σ_i code[r,k,i] · xq[b,k,i] + Σ_k offset[r,k] · xscale[b,k] · Σ_i xq[b,k,i]`
//!
//! (the scheme of llama.cpp's Q8_0 × Q8_0 and Q4_1 × Q8_1 dot products, with wider
//! activation codes where the instructions allow it cheaply). The sums stay f32 to the end,
//! so in bf16 the logits keep the precision that bf16 outputs would lose: logits near 20
//! round to steps of 0.125 in bf16, enough to tie or swap the two best tokens of an
//! uncertain step. Every output element is computed the same way whatever the batch, so
//! results do not depend on which other sequences share the step. Rows are spread over
//! libtorch's threads (see `parallel`).
//!
//! [`q8_accelerated`] and [`q4_preferred`] say whether this processor has the
//! instructions; without them the engine keeps libtorch's int8 and int4 kernels.

use half::{bf16, f16};

use crate::element::Element;
use tch::{Kind, Tensor};

use crate::error::{EngineError, Result};
use crate::parallel;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

/// Elements per quantization block, of weights and of activations alike.
pub const BLOCK: usize = 32;

/// Whether the AVX-512 VNNI kernel runs on this processor.
fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether 8-bit weights have a vector kernel here (AVX-512 VNNI, or AVX2 with FMA and
/// F16C), faster than libtorch's per-row int8 kernel.
pub fn q8_accelerated() -> bool {
    vnni() || crate::simd::avx2()
}

/// Whether 4-bit weights should use this module's kernel rather than libtorch's int4
/// one: on AVX2 processors without AVX-512 VNNI, where libtorch's kernel measured about
/// 2x slower at one to eight rows (see the README). With AVX-512, libtorch's kernel is
/// kept.
pub fn q4_preferred() -> bool {
    crate::simd::avx2() && !vnni()
}

/// How many bits each code takes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Bits {
    /// One byte per code, 1..=255 (128 is zero).
    Eight,
    /// Two codes per byte, 0..=15: byte `j` of a block holds element `j` in its low
    /// nibble and element `j + 16` in its high one (GGUF's Q4 layout).
    Four,
}

impl Bits {
    /// Bytes of codes per block.
    const fn block_bytes(self) -> usize {
        match self {
            Bits::Eight => BLOCK,
            Bits::Four => BLOCK / 2,
        }
    }
}

/// A `[rows, cols]` weight as quantized blocks along each row.
pub struct QuantWeight {
    bits: Bits,
    rows: usize,
    cols: usize,
    /// Blocks per row, padded to an even count (the padding has zero scale and offset).
    blocks: usize,
    /// `rows * blocks * bits.block_bytes()` codes.
    codes: Vec<u8>,
    /// `rows * blocks` scales and offsets, in half precision to keep the bytes streamed
    /// per step down.
    scales: Vec<f16>,
    offsets: Vec<f16>,
}

fn padded_blocks(cols: usize) -> usize {
    cols.div_ceil(BLOCK).next_multiple_of(2)
}

fn quantize_error(message: String) -> EngineError {
    EngineError::Quantize(message)
}

impl QuantWeight {
    /// Quantizes a dense `[rows, cols]` weight to 8-bit codes, one scale per block of
    /// 32 (`w ≈ scale * (code - 128)`, codes 1..=255), reading a band of rows at a time
    /// so that no full-size f32 copy is made.
    pub fn from_dense_q8(weight: &Tensor) -> Result<Self> {
        let &[rows, cols] = &weight.size()[..] else {
            return Err(quantize_error(format!(
                "expected a 2-D weight, got {:?}",
                weight.size()
            )));
        };
        let (rows, cols) = (rows as usize, cols as usize);
        let blocks = padded_blocks(cols);
        let bytes = BLOCK;
        let mut codes = vec![128u8; rows * blocks * bytes];
        let mut scales = vec![f16::ZERO; rows * blocks];
        let mut offsets = vec![f16::ZERO; rows * blocks];
        let band = 2048;
        let mut start = 0;
        while start < rows {
            let len = band.min(rows - start);
            let values = Vec::<f32>::try_from(
                weight
                    .f_narrow(0, start as i64, len as i64)?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()?
                    .f_flatten(0, -1)?,
            )?;
            for i in 0..len {
                let r = start + i;
                let row = &values[i * cols..(i + 1) * cols];
                for (k, chunk) in row.chunks(BLOCK).enumerate() {
                    let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
                    if amax == 0.0 || !amax.is_finite() {
                        continue;
                    }
                    // The scale as stored (half precision), so that codes match it.
                    let scale = f16::from_f32(amax / 127.0);
                    let s = scale.to_f32();
                    if s == 0.0 {
                        continue;
                    }
                    let dst = &mut codes[(r * blocks + k) * bytes..];
                    for (j, v) in chunk.iter().enumerate() {
                        dst[j] = ((v / s).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
                    }
                    scales[r * blocks + k] = scale;
                    offsets[r * blocks + k] = f16::from_f32(-128.0 * s);
                }
            }
            start += len;
        }
        Ok(Self {
            bits: Bits::Eight,
            rows,
            cols,
            blocks,
            codes,
            scales,
            offsets,
        })
    }

    /// A 4-bit weight from codes in 0..16 (`rows * cols`, row-major) with one scale and
    /// zero per group of 32 columns (`w = (code - 8) * scale + zero`, the form of
    /// `linear::Int4Codes`). Scales and offsets are kept in half precision, which holds
    /// GGUF's Q4_0/Q4_1 values exactly.
    pub fn from_q4(
        rows: usize,
        cols: usize,
        codes: &[i32],
        scales: &[f32],
        zeros: &[f32],
    ) -> Result<Self> {
        let groups = cols / BLOCK;
        if !cols.is_multiple_of(BLOCK)
            || codes.len() != rows * cols
            || scales.len() != rows * groups
            || zeros.len() != rows * groups
        {
            return Err(quantize_error(format!(
                "4-bit codes for a [{rows}, {cols}] weight do not match its groups of {BLOCK}"
            )));
        }
        let blocks = padded_blocks(cols);
        let half = BLOCK / 2;
        let mut packed = vec![0u8; rows * blocks * half];
        let mut block_scales = vec![f16::ZERO; rows * blocks];
        let mut offsets = vec![f16::ZERO; rows * blocks];
        for r in 0..rows {
            for k in 0..groups {
                let group = &codes[r * cols + k * BLOCK..r * cols + (k + 1) * BLOCK];
                if let Some(bad) = group.iter().find(|c| !(0..16).contains(*c)) {
                    return Err(quantize_error(format!("4-bit code {bad} out of 0..16")));
                }
                let dst = &mut packed[(r * blocks + k) * half..(r * blocks + k + 1) * half];
                for (j, byte) in dst.iter_mut().enumerate() {
                    *byte = (group[j] as u8) | ((group[j + half] as u8) << 4);
                }
                let (scale, zero) = (scales[r * groups + k], zeros[r * groups + k]);
                block_scales[r * blocks + k] = f16::from_f32(scale);
                offsets[r * blocks + k] = f16::from_f32(zero - 8.0 * scale);
            }
        }
        Ok(Self {
            bits: Bits::Four,
            rows,
            cols,
            blocks,
            codes: packed,
            scales: block_scales,
            offsets,
        })
    }

    pub fn bits(&self) -> Bits {
        self.bits
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The code of row `r`, column `c`.
    fn code(&self, r: usize, c: usize) -> u8 {
        let block = (r * self.blocks + c / BLOCK) * self.bits.block_bytes();
        match self.bits {
            Bits::Eight => self.codes[block + c % BLOCK],
            Bits::Four => {
                let j = c % BLOCK;
                let byte = self.codes[block + j % (BLOCK / 2)];
                if j < BLOCK / 2 {
                    byte & 0x0f
                } else {
                    byte >> 4
                }
            }
        }
    }

    /// The weight as it is represented, `[rows, cols]` f32 (for tests and checks).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for r in 0..self.rows {
            for c in 0..self.cols {
                let k = r * self.blocks + c / BLOCK;
                out.push(
                    self.scales[k].to_f32() * self.code(r, c) as f32 + self.offsets[k].to_f32(),
                );
            }
        }
        out
    }

    /// `x @ selfᵀ` for `x` of `[batch, cols]` (f32, bf16 or f16 on the CPU); the result is
    /// `[batch, rows]` in `x`'s kind.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul_with(x, Implementation::Best, None)
    }

    /// Like [`matmul`](Self::matmul), but the result is f32 whatever `x`'s kind: the sums
    /// are f32 anyway, and rounding them to bf16 would cost logits their precision.
    pub fn matmul_f32(&self, x: &Tensor) -> Result<Tensor> {
        self.matmul_with(x, Implementation::Best, Some(Kind::Float))
    }

    fn matmul_with(
        &self,
        x: &Tensor,
        implementation: Implementation,
        out_kind: Option<Kind>,
    ) -> Result<Tensor> {
        let &[batch, cols] = &x.size()[..] else {
            return Err(quantize_error(format!("input {:?} must be 2-D", x.size())));
        };
        if cols as usize != self.cols || x.device() != tch::Device::Cpu {
            return Err(quantize_error(format!(
                "input {:?} on {:?} does not match a CPU weight of {} columns",
                x.size(),
                x.device(),
                self.cols
            )));
        }
        let batch = batch as usize;
        let x = x.f_contiguous()?;
        let out_kind = out_kind.unwrap_or(x.kind());
        let out = Tensor::f_empty(
            [batch as i64, self.rows as i64],
            (out_kind, tch::Device::Cpu),
        )?;
        let kernel = self.kernel(implementation);
        let acts = match x.kind() {
            Kind::BFloat16 => Activations::quantize(slice_of::<bf16>(&x)?, batch, self, kernel),
            Kind::Half => Activations::quantize(slice_of::<f16>(&x)?, batch, self, kernel),
            Kind::Float => Activations::quantize(slice_of::<f32>(&x)?, batch, self, kernel),
            other => {
                return Err(quantize_error(format!(
                    "unsupported activation kind {other:?}"
                )))
            }
        };
        match out_kind {
            Kind::BFloat16 => self.run::<bf16>(&acts, &out, kernel)?,
            Kind::Half => self.run::<f16>(&acts, &out, kernel)?,
            _ => self.run::<f32>(&acts, &out, kernel)?,
        }
        Ok(out)
    }

    /// The kernel that `implementation` runs on this processor for these codes.
    fn kernel(&self, implementation: Implementation) -> Kernel {
        let avx2 = crate::simd::avx2();
        match implementation {
            Implementation::Best if self.bits == Bits::Eight && vnni() => Kernel::Avx512Vnni,
            Implementation::Best | Implementation::Avx2 if avx2 => Kernel::Avx2,
            Implementation::PortableOneLevel => Kernel::PortableOneLevel,
            _ => Kernel::Portable,
        }
    }

    /// Computes the product into `out` (`[batch, rows]`, contiguous, of `T`).
    fn run<T: Element>(&self, acts: &Activations, out: &Tensor, kernel: Kernel) -> Result<()> {
        let batch = acts.batch;
        let len = batch * self.rows;
        let ptr = out.data_ptr() as *mut T;
        if out.numel() != len
            || (len > 0
                && (ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>())))
        {
            return Err(quantize_error("output storage is not addressable".into()));
        }
        let sink = Sink { ptr, len };
        let threads = tch::get_num_threads().max(1) as usize;
        let chunk = self.rows.div_ceil(threads * 4).next_multiple_of(8).max(8);
        let tasks = self.rows.div_ceil(chunk);
        let rows = self.rows;
        parallel::for_each(tasks, &|t| {
            let span = t * chunk..((t + 1) * chunk).min(rows);
            match kernel {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `kernel()` checked the instructions; the weight, the
                // activations and `sink` (`batch * rows` elements) agree in shape.
                Kernel::Avx512Vnni => unsafe { avx512::rows(self, acts, span, &sink) },
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as above.
                Kernel::Avx2 => unsafe { avx2::rows(self, acts, span, &sink) },
                _ => portable_rows(self, acts, span, &sink),
            }
        })
        .map_err(|e| quantize_error(e.to_string()))
    }
}

/// Which implementation a caller asks for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Implementation {
    /// The fastest kernel this processor has for the weight's codes.
    Best,
    /// The AVX2 kernel where available, else portable (tests compare them all).
    #[cfg_attr(not(test), allow(dead_code))]
    Avx2,
    /// The portable loop only.
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
    /// The portable loop on activations with one code per value, as the AVX-512 VNNI
    /// kernel takes them (tests compare the two).
    #[cfg_attr(not(test), allow(dead_code))]
    PortableOneLevel,
}

/// The kernel that computes the rows.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    /// AVX-512 VNNI, 8-bit codes only.
    Avx512Vnni,
    /// AVX2 with FMA and F16C, both code widths.
    Avx2,
    Portable,
    PortableOneLevel,
}

impl Kernel {
    /// Whether the activations get second codes (see [`Activations`]): everywhere but in
    /// the AVX-512 VNNI kernel, which keeps the one code per value that it was checked
    /// with on AMX machines.
    fn two_level(self) -> bool {
        !matches!(self, Kernel::Avx512Vnni | Kernel::PortableOneLevel)
    }
}

/// The activations of one product, quantized per block of 32.
///
/// Except for the AVX-512 VNNI kernel, each value gets a second 8-bit code for what the
/// first leaves: `x ≈ s · (hi + lo / 256)`, i.e. 16-bit precision relative to its block's
/// largest value, where 8 bits alone moved greedy near ties on an AVX2 machine (the
/// default model's chat answer among them, in the output head, and the France
/// continuation, in the layers). They are kept as one 16-bit code per value,
/// `256 · hi + lo`, whose block scale is `s / 256`.
struct Activations {
    batch: usize,
    /// `batch * blocks * BLOCK` codes (zero in the padding).
    codes: Vec<i8>,
    /// The 16-bit codes `256 · hi + lo`, as many, or none (see [`Kernel::two_level`]).
    wide: Vec<i16>,
    /// `batch * blocks`: each block's scale (`s / 256` with second codes), and the sum of
    /// its values as the codes represent them.
    scales: Vec<f32>,
    sums: Vec<f32>,
    /// `batch * blocks * 8`: each pair of blocks' scales spread over 16 lanes
    /// (`[s_k; 8], [s_k+1; 8]`), as the vector kernel applies them.
    lane_scales: Vec<f32>,
}

impl Activations {
    fn quantize<T: Element>(x: &[T], batch: usize, weight: &QuantWeight, kernel: Kernel) -> Self {
        let (cols, blocks) = (weight.cols, weight.blocks);
        let two_level = kernel.two_level();
        let mut acts = Self {
            batch,
            codes: vec![0; batch * blocks * BLOCK],
            wide: vec![0; if two_level { batch * blocks * BLOCK } else { 0 }],
            scales: vec![0.0; batch * blocks],
            sums: vec![0.0; batch * blocks],
            lane_scales: vec![0.0; batch * blocks * 8],
        };
        let mut row = [0f32; BLOCK];
        for b in 0..batch {
            for k in 0..cols.div_ceil(BLOCK) {
                let start = b * cols + k * BLOCK;
                let end = (start + BLOCK).min((b + 1) * cols);
                row.fill(0.0);
                for (dst, src) in row.iter_mut().zip(&x[start..end]) {
                    *dst = src.widen();
                }
                let at = (b * blocks + k) * BLOCK;
                let dst = &mut acts.codes[at..at + BLOCK];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the AVX-512 kernel is only chosen where its instructions are.
                let (scale, sum) = if kernel == Kernel::Avx512Vnni {
                    unsafe { avx512::quantize_block(&row, dst) }
                } else {
                    quantize_block(&row, dst)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let (scale, sum) = quantize_block(&row, dst);
                let (scale, sum) = if two_level {
                    let high = &acts.codes[at..at + BLOCK];
                    let mut low = [0i8; BLOCK];
                    let low_sum = quantize_remainder(&row, scale, high, &mut low);
                    for ((w, h), l) in acts.wide[at..at + BLOCK].iter_mut().zip(high).zip(low) {
                        *w = 256 * *h as i16 + l as i16;
                    }
                    (scale / 256.0, 256 * sum + low_sum)
                } else {
                    (scale, sum)
                };
                acts.scales[b * blocks + k] = scale;
                acts.sums[b * blocks + k] = scale * sum as f32;
                let pair = (b * blocks + k - k % 2) * 8;
                let lanes = if k % 2 == 0 {
                    pair..pair + 8
                } else {
                    pair + 8..pair + 16
                };
                acts.lane_scales[lanes].fill(scale);
            }
        }
        acts
    }
}

/// Quantizes 32 values to signed 8-bit codes with one scale (the largest magnitude maps
/// to ±127, rounding half to even); returns the scale and the sum of the codes. A block
/// of zeros, or one with an infinite or NaN value, gets scale 0 and zero codes.
fn quantize_block(row: &[f32; BLOCK], dst: &mut [i8]) -> (f32, i32) {
    let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    if !(amax > 0.0 && amax.is_finite()) || row.iter().any(|v| v.is_nan()) {
        dst.fill(0);
        return (0.0, 0);
    }
    let inv = 127.0 / amax;
    let mut sum = 0i32;
    for (d, v) in dst.iter_mut().zip(row) {
        let q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
        *d = q as i8;
        sum += q;
    }
    (amax / 127.0, sum)
}

/// The second codes of a block whose first codes `high` have `scale`: what each value's
/// first code leaves, `x - scale * hi` (at most half a step), in steps of `scale / 256`
/// (rounding half to even, clamped to ±127); returns their sum.
fn quantize_remainder(row: &[f32; BLOCK], scale: f32, high: &[i8], dst: &mut [i8]) -> i32 {
    if scale == 0.0 {
        dst.fill(0);
        return 0;
    }
    let inv = 256.0 / scale;
    let mut sum = 0i32;
    for ((d, v), h) in dst.iter_mut().zip(row).zip(high) {
        let rest = v - scale * *h as f32;
        let q = (rest * inv).round_ties_even().clamp(-127.0, 127.0) as i32;
        *d = q as i8;
        sum += q;
    }
    sum
}

/// The scalar loop: the same sums as the vector kernel, element by element.
fn portable_rows<T: Element>(
    w: &QuantWeight,
    acts: &Activations,
    rows: std::ops::Range<usize>,
    out: &Sink<T>,
) {
    for r in rows {
        for b in 0..acts.batch {
            let mut total = 0f32;
            for k in 0..w.blocks {
                let mut dot = 0i32;
                for j in 0..BLOCK {
                    let c = k * BLOCK + j;
                    let code = if c < w.cols { w.code(r, c) as i32 } else { 0 };
                    let at = (b * w.blocks + k) * BLOCK + j;
                    let x = match acts.wide.get(at) {
                        Some(&wide) => wide as i32,
                        None => acts.codes[at] as i32,
                    };
                    dot += code * x;
                }
                let i = r * w.blocks + k;
                total += w.scales[i].to_f32() * acts.scales[b * w.blocks + k] * dot as f32
                    + w.offsets[i].to_f32() * acts.sums[b * w.blocks + k];
            }
            out.put(b * w.rows + r, total);
        }
    }
}

/// The output, `[batch, rows]`, written by several threads at disjoint elements.
struct Sink<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the tasks of one product write disjoint elements (each its own rows of the
// weight, i.e. its own columns of the output), and nothing reads them meanwhile.
unsafe impl<T: Send> Sync for Sink<T> {}

impl<T: Element> Sink<T> {
    /// Stores `value` at element `i` (ignored out of bounds).
    fn put(&self, i: usize, value: f32) {
        if i < self.len {
            // SAFETY: `i` is in bounds of the output tensor's storage, which outlives the
            // product, and no other task writes element `i` (see the `Sync` impl).
            unsafe { self.ptr.add(i).write(T::narrow(value)) }
        }
    }
}

/// Borrows a contiguous CPU tensor as a slice of `T` (whose kind the caller checked).
fn slice_of<T>(t: &Tensor) -> Result<&[T]> {
    let len = t.numel();
    if len == 0 {
        return Ok(&[]);
    }
    let ptr = t.data_ptr() as *const T;
    if ptr.is_null() || !(ptr as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return Err(quantize_error(
            "activation storage is not addressable".into(),
        ));
    }
    // SAFETY: the tensor is contiguous and on the CPU, its elements are `T` (the caller
    // matched its kind), and the borrow of `t` keeps the storage alive.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random sequence in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn weight(rows: usize, cols: usize, seed: u64) -> (QuantWeight, Vec<f32>) {
        let dense = values(rows * cols, seed);
        let t = Tensor::from_slice(&dense).view([rows as i64, cols as i64]);
        (QuantWeight::from_dense_q8(&t).unwrap(), dense)
    }

    fn dense_product(w: &[f32], x: &[f32], rows: usize, cols: usize, batch: usize) -> Vec<f32> {
        let mut y = vec![0f32; batch * rows];
        for b in 0..batch {
            for r in 0..rows {
                y[b * rows + r] = (0..cols).map(|c| w[r * cols + c] * x[b * cols + c]).sum();
            }
        }
        y
    }

    fn run(
        w: &QuantWeight,
        x: &[f32],
        batch: usize,
        kind: Kind,
        imp: Implementation,
        out: Option<Kind>,
    ) -> Vec<f32> {
        let t = Tensor::from_slice(x)
            .view([batch as i64, w.cols() as i64])
            .to_kind(kind);
        let y = w.matmul_with(&t, imp, out).unwrap();
        assert_eq!(y.kind(), out.unwrap_or(kind));
        Vec::<f32>::try_from(y.to_kind(Kind::Float).flatten(0, -1)).unwrap()
    }

    fn assert_close(got: &[f32], want: &[f32], tolerance: f32) {
        assert_eq!(got.len(), want.len());
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tolerance * scale,
                "element {i}: {g} vs {w} (scale {scale})"
            );
        }
    }

    #[test]
    fn quantization_is_close_to_the_dense_weight() {
        let (w, dense) = weight(5, 96, 4);
        assert_close(&w.dequantize(), &dense, 1.0 / 127.0);
        // An all-zero block stays exactly zero.
        let zeros = Tensor::zeros([2, 32], (Kind::Float, tch::Device::Cpu));
        let zero = QuantWeight::from_dense_q8(&zeros).unwrap();
        assert!(zero.dequantize().iter().all(|&v| v == 0.0));
    }

    /// Multiplies `w` (whose dense values are `dense`) by a random batch in every
    /// implementation: the portable loop must be within `tolerance` of the dense product,
    /// the vector kernels within 1e-5 of the portable loop. Returns the input and the
    /// dense product.
    fn check_implementations(
        w: &QuantWeight,
        dense: &[f32],
        batch: usize,
        seed: u64,
        tolerance: f32,
    ) -> (Vec<f32>, Vec<f32>) {
        let (rows, cols) = (w.rows(), w.cols());
        let x = values(batch * cols, seed);
        let want = dense_product(dense, &x, rows, cols, batch);
        let portable = run(w, &x, batch, Kind::Float, Implementation::Portable, None);
        assert_close(&portable, &want, tolerance);
        let avx2 = run(w, &x, batch, Kind::Float, Implementation::Avx2, None);
        assert_close(&avx2, &portable, 1e-5);
        let best = run(w, &x, batch, Kind::Float, Implementation::Best, None);
        if w.kernel(Implementation::Best) == Kernel::Avx512Vnni {
            let one_level = run(
                w,
                &x,
                batch,
                Kind::Float,
                Implementation::PortableOneLevel,
                None,
            );
            assert_close(&one_level, &want, 0.02);
            assert_close(&best, &one_level, 1e-5);
        } else {
            assert_close(&best, &portable, 1e-5);
        }
        (x, want)
    }

    #[test]
    fn products_match_the_dense_product_in_every_implementation() {
        // 3 blocks (padded to 4), 5 blocks of which the last is partial, 18 blocks.
        for (rows, cols) in [(40, 96), (17, 150), (65, 576)] {
            let (w, dense) = weight(rows, cols, rows as u64);
            for batch in [1, 2, 3, 5, 8, 13] {
                // int8 weights: about 1% of the largest output.
                check_implementations(&w, &dense, batch, batch as u64 + 7, 0.02);
            }
        }
    }

    /// A 4-bit weight as GGUF's Q4_1 stores it (half-precision scales and minimums), and
    /// its dense values.
    fn q4_weight(rows: usize, cols: usize, seed: u64) -> (QuantWeight, Vec<f32>) {
        let groups = rows * cols / BLOCK;
        let noise = values(rows * cols + 2 * groups, seed);
        let codes: Vec<i32> = noise[..rows * cols]
            .iter()
            .map(|v| ((v + 1.0) * 8.0).clamp(0.0, 15.0) as i32)
            .collect();
        let round = |v: f32| f16::from_f32(v).to_f32();
        let scales: Vec<f32> = noise[rows * cols..rows * cols + groups]
            .iter()
            .map(|v| round(0.01 + 0.05 * v.abs()))
            .collect();
        let mins: Vec<f32> = noise[rows * cols + groups..]
            .iter()
            .map(|v| round(-0.4 * v.abs()))
            .collect();
        // Q4_1's `q * d + m` as `(q - 8) * d + (m + 8 d)`, the way the GGUF reader gives it.
        let zeros: Vec<f32> = mins.iter().zip(&scales).map(|(m, d)| m + 8.0 * d).collect();
        let dense = (0..rows * cols)
            .map(|i| {
                let g = i / BLOCK;
                codes[i] as f32 * scales[g] + mins[g]
            })
            .collect();
        let w = QuantWeight::from_q4(rows, cols, &codes, &scales, &zeros).unwrap();
        (w, dense)
    }

    #[test]
    fn four_bit_weights_keep_their_values_and_multiply_like_the_dense_weight() {
        for (rows, cols) in [(40, 96), (13, 64), (65, 576)] {
            let (w, dense) = q4_weight(rows, cols, rows as u64);
            assert_eq!(w.bits(), Bits::Four);
            assert_eq!(w.dequantize(), dense, "the copy is lossless");
            for batch in [1, 2, 3, 5, 8] {
                // Only the activations are quantized, to 16 bits per block (two 8-bit
                // codes): within 1e-3 of the largest output.
                let (x, want) = check_implementations(&w, &dense, batch, batch as u64 + 3, 1e-3);
                let bf16 = run(&w, &x, batch, Kind::BFloat16, Implementation::Best, None);
                assert_close(&bf16, &want, 0.03);
            }
        }
    }

    #[test]
    fn four_bit_codes_out_of_range_or_misshapen_are_errors() {
        let ones = vec![1f32; 2];
        assert!(QuantWeight::from_q4(2, 32, &[16; 64], &ones, &ones).is_err());
        assert!(QuantWeight::from_q4(2, 32, &[-1; 64], &ones, &ones).is_err());
        assert!(QuantWeight::from_q4(2, 48, &[0; 96], &ones, &ones).is_err());
        assert!(QuantWeight::from_q4(2, 32, &[0; 63], &ones, &ones).is_err());
        assert!(QuantWeight::from_q4(2, 32, &[0; 64], &ones, &ones).is_ok());
    }

    #[test]
    fn reduced_precision_inputs_and_f32_outputs() {
        let (rows, cols, batch) = (33, 160, 5);
        let (w, dense) = weight(rows, cols, 9);
        let x = values(batch * cols, 10);
        let want = dense_product(&dense, &x, rows, cols, batch);
        for kind in [Kind::Float, Kind::BFloat16, Kind::Half] {
            let same = run(&w, &x, batch, kind, Implementation::Best, None);
            assert_close(&same, &want, 0.03);
            let wide = run(&w, &x, batch, kind, Implementation::Best, Some(Kind::Float));
            assert_close(&wide, &want, 0.03);
        }
    }

    #[test]
    fn f32_results_keep_what_bf16_rounds_away() {
        // Two rows whose products differ by less than bf16's step near 20.
        let cols = 64;
        let mut dense = vec![20.0 / cols as f32; 2 * cols];
        dense[cols] += 0.03 / cols as f32;
        let w =
            QuantWeight::from_dense_q8(&Tensor::from_slice(&dense).view([2, cols as i64])).unwrap();
        let x = vec![1f32; cols];
        let wide = run(
            &w,
            &x,
            1,
            Kind::BFloat16,
            Implementation::Best,
            Some(Kind::Float),
        );
        assert!(wide[1] > wide[0], "{wide:?}");
        let narrow = run(&w, &x, 1, Kind::BFloat16, Implementation::Best, None);
        assert_eq!(narrow[0], narrow[1]);
    }

    #[test]
    fn each_row_is_independent_of_the_batch() {
        let (w, _) = weight(48, 128, 3);
        let x = values(9 * 128, 11);
        let all = run(&w, &x, 9, Kind::Float, Implementation::Best, None);
        for b in 0..9 {
            let alone = &x[b * 128..(b + 1) * 128];
            let one = run(&w, alone, 1, Kind::Float, Implementation::Best, None);
            assert_eq!(one, all[b * 48..(b + 1) * 48]);
        }
    }

    #[test]
    fn vector_and_scalar_activation_codes_agree() {
        let mut row = [0f32; BLOCK];
        for seed in 0..50u64 {
            row.copy_from_slice(&values(BLOCK, seed));
            // Values that land exactly on a half step, to check the rounding mode.
            row[3] = row.iter().fold(0f32, |m, v| m.max(v.abs())) * (2.5 / 127.0);
            let (mut a, mut b) = ([0i8; BLOCK], [0i8; BLOCK]);
            let scalar = quantize_block(&row, &mut a);
            #[cfg(target_arch = "x86_64")]
            if vnni() {
                // SAFETY: `vnni()` holds.
                let vector = unsafe { avx512::quantize_block(&row, &mut b) };
                assert_eq!(scalar, vector);
                assert_eq!(a, b);
            }
        }
        let (mut a, nan) = ([1i8; BLOCK], [f32::NAN; BLOCK]);
        assert_eq!(quantize_block(&nan, &mut a), (0.0, 0));
        assert_eq!(a, [0i8; BLOCK]);
    }

    /// Times the output head of SmolLM2 (49152 x 576) against libtorch's int8 kernel and
    /// the dense bf16 product, interleaved: `cargo test --release -p tessera-shard --lib
    /// quant_matmul::tests::timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn timing() {
        use crate::linear::Linear;
        let (rows, cols) = (49152i64, 576i64);
        let dense = Tensor::from_slice(&values((rows * cols) as usize, 1))
            .view([rows, cols])
            .to_kind(Kind::BFloat16);
        let ours = QuantWeight::from_dense_q8(&dense).unwrap();
        let dense_linear = Linear::dense(dense.shallow_clone());
        // Without VNNI `with_int8` takes libtorch's per-row int8 kernel; force it here.
        let torch_int8 = {
            let w = dense.to_kind(Kind::Float);
            let scale = w.abs().amax([1i64].as_slice(), true).clamp_min(1e-12) / 127.0;
            let q = (w / &scale).round().to_kind(Kind::Int8);
            (q, scale.squeeze_dim(1).to_kind(Kind::BFloat16))
        };
        for batch in [1i64, 8, 32, 64] {
            let x = Tensor::from_slice(&values((batch * cols) as usize, 5))
                .view([batch, cols])
                .to_kind(Kind::BFloat16);
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            let time = |f: &dyn Fn()| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            };
            for _ in 0..11 {
                a.push(time(&|| drop(ours.matmul_f32(&x).unwrap())));
                b.push(time(&|| {
                    drop(x.internal_weight_int8pack_mm(&torch_int8.0, &torch_int8.1))
                }));
                c.push(time(&|| drop(dense_linear.forward(&x).unwrap())));
            }
            for v in [&mut a, &mut b, &mut c] {
                v.sort_by(f64::total_cmp);
            }
            println!(
                "batch {batch}: vnni q8 {:.2} ms, libtorch int8 {:.2} ms, dense bf16 {:.2} ms (medians of 11)",
                a[5], b[5], c[5]
            );
        }
    }

    /// Times SmolLM2's projections as 4-bit weights in this module's kernel against
    /// libtorch's int4 kernel (bf16 activations, as the engine gives it f32 weights' small
    /// batches), interleaved: `cargo test --release -p tessera-shard --lib
    /// quant_matmul::tests::q4_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn q4_timing() {
        for (name, rows, cols) in [
            ("qkv", 960usize, 576usize),
            ("o", 576, 576),
            ("gate_up", 3072, 576),
            ("down", 576, 1536),
        ] {
            let (ours, _) = q4_weight(rows, cols, 1);
            let codes: Vec<i32> = (0..rows * cols)
                .map(|i| ours.code(i / cols, i % cols) as i32)
                .collect();
            let groups = (cols / BLOCK) as i64;
            let packed = Tensor::from_slice(&codes)
                .view([rows as i64, cols as i64])
                .internal_convert_weight_to_int4pack_for_cpu(2);
            let scales = Tensor::ones([rows as i64, groups], (Kind::Float, tch::Device::Cpu));
            let scales_zeros = Tensor::stack(&[scales.tr(), scales.tr()], -1)
                .to_kind(Kind::BFloat16)
                .contiguous();
            for batch in [1usize, 4, 8] {
                let x =
                    Tensor::from_slice(&values(batch * cols, 5)).view([batch as i64, cols as i64]);
                let xb = x.to_kind(Kind::BFloat16);
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let time = |f: &dyn Fn()| {
                    let t = std::time::Instant::now();
                    for _ in 0..20 {
                        f();
                    }
                    t.elapsed().as_secs_f64() * 1e3 / 20.0
                };
                for _ in 0..11 {
                    a.push(time(&|| drop(ours.matmul(&x).unwrap())));
                    b.push(time(&|| {
                        drop(xb.internal_weight_int4pack_mm_for_cpu(&packed, 32, &scales_zeros))
                    }));
                }
                a.sort_by(f64::total_cmp);
                b.sort_by(f64::total_cmp);
                println!(
                    "{name} [{rows}x{cols}] batch {batch}: ours {:.3} ms, libtorch int4 {:.3} ms (medians of 11)",
                    a[5], b[5]
                );
            }
        }
    }

    /// Where oneDNN's packed f32 product overtakes this kernel, row count by row count:
    /// SmolLM2's Q4 projections and its 8-bit output head against the same shapes in
    /// f32, packed (`cargo test --release -p tessera-shard --lib
    /// quant_matmul::tests::crossover_timing -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn crossover_timing() {
        let median = |f: &dyn Fn()| {
            let mut t: Vec<f64> = (0..11)
                .map(|_| {
                    let s = std::time::Instant::now();
                    for _ in 0..10 {
                        f();
                    }
                    s.elapsed().as_secs_f64() * 1e3 / 10.0
                })
                .collect();
            t.sort_by(f64::total_cmp);
            t[5]
        };
        for (name, rows, cols, bits) in [
            ("qkv", 960usize, 576usize, 4),
            ("o", 576, 576, 4),
            ("gate_up", 3072, 576, 4),
            ("down", 576, 1536, 4),
            ("head", 49152, 576, 8),
        ] {
            let (ours, dense) = if bits == 4 {
                q4_weight(rows, cols, 1)
            } else {
                weight(rows, cols, 1)
            };
            let dense = Tensor::from_slice(&dense).view([rows as i64, cols as i64]);
            let packed = crate::packed_linear::PackedWeight::pack(&dense).unwrap();
            let mut line = format!("{name} [{rows}x{cols}] q{bits} / packed f32, ms:");
            for batch in [1usize, 2, 3, 4, 6, 8, 12, 16] {
                let x =
                    Tensor::from_slice(&values(batch * cols, 5)).view([batch as i64, cols as i64]);
                let a = median(&|| drop(ours.matmul(&x).unwrap()));
                let b = median(&|| drop(packed.forward(&x).unwrap()));
                line += &format!(" {batch}: {a:.3} / {b:.3};");
            }
            println!("{line}");
        }
    }

    #[test]
    fn a_wrong_shape_is_an_error() {
        let (w, _) = weight(8, 64, 1);
        let x = Tensor::zeros([2, 32], (Kind::Float, tch::Device::Cpu));
        assert!(w.matmul(&x).is_err());
        let x = Tensor::zeros([64], (Kind::Float, tch::Device::Cpu));
        assert!(w.matmul(&x).is_err());
        let x = Tensor::zeros([1, 64], (Kind::Int, tch::Device::Cpu));
        assert!(w.matmul(&x).is_err());
    }
}
