//! The AVX2 kernel: one block (32 codes) per step. The weight's codes are widened to 16
//! bits (8-bit codes made signed first, `code - 128`) and multiplied by the activations'
//! 16-bit codes with `vpmaddwd` (pairs of 16-bit products summed into 32 bits, at most
//! 2 · 128 · 32,767 per pair), the block's two halves added into 8 lanes, converted to
//! f32 and scaled by the two blocks' scales; in tiles of up to 4 weight rows by 2
//! sequences. The 8-bit product is then `Σ (code - 128) · xq` directly, which already
//! includes the offset (`-128 · scale`); 4-bit weights add their offsets' share after the
//! blocks.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Activations, Bits, Element, QuantWeight, Sink, BLOCK};

/// # Safety
/// AVX2, FMA and F16C must be available; `acts` must have been quantized for `w` with
/// second codes (`Kernel::Avx2.two_level()`), and
/// `out` must hold `acts.batch * w.rows` elements; `rows` must lie within `w.rows`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn rows<T: Element>(
    w: &QuantWeight,
    acts: &Activations,
    rows: Range<usize>,
    out: &Sink<T>,
) {
    // R weight rows share each activation load; N sequences share each weight load.
    let mut r = rows.start;
    while r < rows.end {
        let four = rows.end - r >= 4;
        let mut b = 0;
        while b < acts.batch {
            let two = acts.batch - b >= 2;
            b += match (w.bits, four, two) {
                (Bits::Four, true, true) => tile::<T, Nibbles, 4, 2>(w, acts, r, b, out),
                (Bits::Four, true, false) => tile::<T, Nibbles, 4, 1>(w, acts, r, b, out),
                (Bits::Four, false, true) => tile::<T, Nibbles, 1, 2>(w, acts, r, b, out),
                (Bits::Four, false, false) => tile::<T, Nibbles, 1, 1>(w, acts, r, b, out),
                (Bits::Eight, true, true) => tile::<T, Bytes, 4, 2>(w, acts, r, b, out),
                (Bits::Eight, true, false) => tile::<T, Bytes, 4, 1>(w, acts, r, b, out),
                (Bits::Eight, false, true) => tile::<T, Bytes, 1, 2>(w, acts, r, b, out),
                (Bits::Eight, false, false) => tile::<T, Bytes, 1, 1>(w, acts, r, b, out),
            };
        }
        r += if four { 4 } else { 1 };
    }
}

/// One code width: how a block's codes are loaded as two vectors of 16-bit values
/// (elements 0-15, then 16-31).
trait Codes {
    /// Whether the weight's offsets must be added after the blocks.
    const OFFSETS: bool;
    unsafe fn load(block: *const u8) -> (__m256i, __m256i);
}

/// 4-bit codes, 16 bytes per block: low nibbles are elements 0-15, high ones 16-31.
struct Nibbles;

impl Codes for Nibbles {
    const OFFSETS: bool = true;

    #[inline(always)]
    unsafe fn load(block: *const u8) -> (__m256i, __m256i) {
        let raw = _mm_loadu_si128(block as *const __m128i);
        let low = _mm_set1_epi8(0x0f);
        let lo = _mm_and_si128(raw, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), low);
        (_mm256_cvtepu8_epi16(lo), _mm256_cvtepu8_epi16(hi))
    }
}

/// 8-bit codes, 32 bytes per block, made signed (`code - 128`).
struct Bytes;

impl Codes for Bytes {
    const OFFSETS: bool = false;

    #[inline(always)]
    unsafe fn load(block: *const u8) -> (__m256i, __m256i) {
        let raw = _mm256_loadu_si256(block as *const __m256i);
        let signed = _mm256_xor_si256(raw, _mm256_set1_epi8(i8::MIN));
        (
            _mm256_cvtepi8_epi16(_mm256_castsi256_si128(signed)),
            _mm256_cvtepi8_epi16(_mm256_extracti128_si256::<1>(signed)),
        )
    }
}

/// Rows `r0..r0 + R` of the weight against sequences `b0..b0 + N`; returns `N`.
#[inline(always)]
unsafe fn tile<T: Element, C: Codes, const R: usize, const N: usize>(
    w: &QuantWeight,
    acts: &Activations,
    r0: usize,
    b0: usize,
    out: &Sink<T>,
) -> usize {
    let blocks = w.blocks;
    let block_bytes = w.bits.block_bytes();
    let row_bytes = blocks * block_bytes;
    let codes = w.codes.as_ptr().add(r0 * row_bytes);
    let scales = w.scales.as_ptr().add(r0 * blocks) as *const i16;
    let x_codes = acts.wide.as_ptr().add(b0 * blocks * BLOCK);
    let x_scales = acts.scales.as_ptr().add(b0 * blocks);
    let mut acc = [[_mm256_setzero_ps(); N]; R];
    for k in 0..blocks {
        let mut xv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); N];
        for (i, xv) in xv.iter_mut().enumerate() {
            let at = x_codes.add((i * blocks + k) * BLOCK);
            *xv = (
                _mm256_loadu_si256(at as *const __m256i),
                _mm256_loadu_si256(at.add(BLOCK / 2) as *const __m256i),
            );
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let wv = C::load(codes.add(j * row_bytes + k * block_bytes));
            let wscale = _mm256_cvtph_ps(_mm_set1_epi16(scales.add(j * blocks + k).read()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let dot = _mm256_add_epi32(
                    _mm256_madd_epi16(wv.0, xv[i].0),
                    _mm256_madd_epi16(wv.1, xv[i].1),
                );
                let scale =
                    _mm256_mul_ps(wscale, _mm256_set1_ps(x_scales.add(i * blocks + k).read()));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, *acc);
            }
        }
    }
    let mut totals = [[0f32; N]; R];
    for (j, acc) in acc.iter().enumerate() {
        for (i, acc) in acc.iter().enumerate() {
            totals[j][i] = sum_lanes(*acc);
        }
    }
    if C::OFFSETS {
        // Σ_k offset[r,k] * xscale[b,k] * Σ xq[b,k], 8 blocks at a time.
        let offsets = w.offsets.as_ptr().add(r0 * blocks);
        let sums = acts.sums.as_ptr().add(b0 * blocks);
        for (j, totals) in totals.iter_mut().enumerate() {
            for (i, total) in totals.iter_mut().enumerate() {
                let (off, sum) = (offsets.add(j * blocks), sums.add(i * blocks));
                let mut lanes = _mm256_setzero_ps();
                let mut k = 0;
                while k + 8 <= blocks {
                    let o = _mm256_cvtph_ps(_mm_loadu_si128(off.add(k) as *const __m128i));
                    lanes = _mm256_fmadd_ps(o, _mm256_loadu_ps(sum.add(k)), lanes);
                    k += 8;
                }
                let mut tail = 0f32;
                while k < blocks {
                    tail += off.add(k).read().to_f32() * sum.add(k).read();
                    k += 1;
                }
                *total += sum_lanes(lanes) + tail;
            }
        }
    }
    for (j, totals) in totals.iter().enumerate() {
        for (i, total) in totals.iter().enumerate() {
            out.put((b0 + i) * w.rows + r0 + j, *total);
        }
    }
    N
}

/// The sum of 8 lanes.
#[inline(always)]
unsafe fn sum_lanes(v: __m256) -> f32 {
    let quad = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let pair = _mm_add_ps(quad, _mm_movehl_ps(quad, quad));
    _mm_cvtss_f32(_mm_add_ss(pair, _mm_movehdup_ps(pair)))
}
