//! The vector kernel: two blocks (64 codes) per step, their byte products summed by
//! `vpdpbusd` into 16 lanes (lanes 0-7 the first block, 8-15 the second), converted to
//! f32 and scaled lane by lane, in tiles of up to 4 weight rows by 8 sequences.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{Activations, Element, QuantWeight, Sink, BLOCK};

/// # Safety
/// AVX-512 F/BW/VL/VNNI must be available; `acts` must have been quantized for `w`, and
/// `out` must hold `acts.batch * w.rows` elements; `rows` must lie within `w.rows`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn rows<T: Element>(
    w: &QuantWeight,
    acts: &Activations,
    rows: Range<usize>,
    out: &Sink<T>,
) {
    // Tiles of R weight rows by N sequences: R rows share each activation load, N
    // sequences share each unpacked weight vector.
    let mut r = rows.start;
    while r < rows.end {
        let four = rows.end - r >= 4;
        let mut b = 0;
        while b < acts.batch {
            let left = acts.batch - b;
            let n = match (four, left) {
                (true, 1) => tile::<T, 4, 1>(w, acts, r, b, out),
                (true, 2 | 3) => tile::<T, 4, 2>(w, acts, r, b, out),
                (true, _) => tile::<T, 4, 4>(w, acts, r, b, out),
                (false, 1..=3) => tile::<T, 1, 1>(w, acts, r, b, out),
                (false, 4..=7) => tile::<T, 1, 4>(w, acts, r, b, out),
                _ => tile::<T, 1, 8>(w, acts, r, b, out),
            };
            b += n;
        }
        r += if four { 4 } else { 1 };
    }
}

/// Rows `r0..r0 + R` of the weight against sequences `b0..b0 + N`; returns `N`.
#[inline(always)]
unsafe fn tile<T: Element, const R: usize, const N: usize>(
    w: &QuantWeight,
    acts: &Activations,
    r0: usize,
    b0: usize,
    out: &Sink<T>,
) -> usize {
    let blocks = w.blocks;
    let pairs = blocks / 2;
    let row_bytes = blocks * BLOCK;
    let codes = w.codes.as_ptr().add(r0 * row_bytes);
    let scales = w.scales.as_ptr().add(r0 * blocks);
    let offsets = w.offsets.as_ptr().add(r0 * blocks);
    let x_codes = acts.codes.as_ptr().add(b0 * blocks * BLOCK);
    let x_lanes = acts.lane_scales.as_ptr().add(b0 * blocks * 8);
    // Lanes 0-7 take the first scale of a pair, 8-15 the second.
    let pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    for p in 0..pairs {
        let mut xv = [_mm512_setzero_si512(); N];
        let mut xs = [_mm512_setzero_ps(); N];
        for i in 0..N {
            xv[i] = _mm512_loadu_si512(x_codes.add((i * blocks + 2 * p) * BLOCK) as *const _);
            xs[i] = _mm512_loadu_ps(x_lanes.add((i * blocks + 2 * p) * 8));
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let wv = _mm512_loadu_si512(codes.add(j * row_bytes + p * 2 * BLOCK) as *const _);
            let pair = _mm_cvtph_ps(_mm_cvtsi32_si128(
                (scales.add(j * blocks + 2 * p) as *const i32).read_unaligned(),
            ));
            let wscale = _mm512_permutexvar_ps(pair_lanes, _mm512_castps128_ps512(pair));
            for i in 0..N {
                let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, xv[i]);
                let scale = _mm512_mul_ps(wscale, xs[i]);
                acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i]);
            }
        }
    }
    // The offsets' share: Σ_k offset[r,k] * xscale[b,k] * Σ xq[b,k].
    let sums = acts.sums.as_ptr().add(b0 * blocks);
    let mut k = 0;
    while k < blocks {
        let len = (blocks - k).min(16);
        let mask: __mmask16 = if len == 16 { 0xffff } else { (1u16 << len) - 1 };
        let mut s = [_mm512_setzero_ps(); N];
        for (i, s) in s.iter_mut().enumerate() {
            *s = _mm512_maskz_loadu_ps(mask, sums.add(i * blocks + k));
        }
        for (j, acc) in acc.iter_mut().enumerate() {
            let off = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(
                mask,
                offsets.add(j * blocks + k) as *const i16,
            ));
            for i in 0..N {
                acc[i] = _mm512_fmadd_ps(off, s[i], acc[i]);
            }
        }
        k += 16;
    }
    for (j, acc) in acc.iter().enumerate() {
        for (i, acc) in acc.iter().enumerate() {
            out.put((b0 + i) * w.rows + r0 + j, _mm512_reduce_add_ps(*acc));
        }
    }
    N
}

/// The vector form of `super::quantize_block` (the same codes: `vcvtps2dq` rounds half
/// to even under the default rounding mode).
///
/// # Safety
/// AVX-512 F must be available; `dst` must hold 32 elements.
#[target_feature(enable = "avx512f")]
pub unsafe fn quantize_block(row: &[f32; BLOCK], dst: &mut [i8]) -> (f32, i32) {
    let a = _mm512_loadu_ps(row.as_ptr());
    let b = _mm512_loadu_ps(row.as_ptr().add(16));
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, b);
    if !(amax > 0.0 && amax.is_finite()) || nan != 0 || dst.len() < BLOCK {
        dst.fill(0);
        return (0.0, 0);
    }
    let inv = _mm512_set1_ps(127.0 / amax);
    let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(dst.as_mut_ptr() as *mut __m128i, _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(
        dst.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtepi32_epi8(qb),
    );
    (
        amax / 127.0,
        _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb)),
    )
}
