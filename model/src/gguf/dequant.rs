//! Dequantization of ggml block formats to `f32`.
//!
//! Each kernel walks the input block by block with fixed-size array views, so
//! the inner loops have constant bounds and no per-element allocation. The
//! arithmetic follows ggml's reference dequantizers operation by operation
//! (e.g. `(d * scale) * q - dmin * m` for the K-quants), so results match
//! ggml and the `gguf` Python package bit for bit.

use half::f16;

use super::{GgmlType, GgufError};

/// Whether [`dequantize_into`] supports `ty`.
pub(super) fn supported(ty: GgmlType) -> bool {
    use GgmlType::*;
    matches!(
        ty,
        F32 | F16
            | BF16
            | F64
            | I8
            | I16
            | I32
            | Q4_0
            | Q4_1
            | Q5_0
            | Q5_1
            | Q8_0
            | Q8_1
            | Q2K
            | Q3K
            | Q4K
            | Q5K
            | Q6K
            | Q8K
    )
}

/// Dequantize `n` elements of `ty` from `bytes` into `out` (`n == out.len()`).
///
/// `n` must be a whole number of blocks of `ty`, and `bytes` must hold exactly
/// those blocks.
pub fn dequantize_into(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), GgufError> {
    dequantize_named(ty, bytes, out, "<buffer>")
}

/// [`dequantize_into`], naming `tensor` in errors.
pub(super) fn dequantize_named(
    ty: GgmlType,
    bytes: &[u8],
    out: &mut [f32],
    tensor: &str,
) -> Result<(), GgufError> {
    let Some((block_size, type_size)) = ty.block_layout() else {
        return Err(GgufError::UnknownType {
            tensor: tensor.to_string(),
            type_id: ty.id(),
        });
    };
    if !supported(ty) {
        return Err(GgufError::UnsupportedType {
            tensor: tensor.to_string(),
            ggml_type: ty,
            type_id: ty.id(),
        });
    }
    let n = out.len();
    if !(n as u64).is_multiple_of(block_size) {
        return Err(GgufError::BadShape(format!(
            "tensor '{tensor}': {n} elements are not a whole number of {ty} blocks of {block_size}"
        )));
    }
    let expected = n as u64 / block_size * type_size;
    if bytes.len() as u64 != expected {
        return Err(GgufError::SizeMismatch {
            ggml_type: ty,
            n,
            expected,
            got: bytes.len(),
        });
    }
    use GgmlType::*;
    match ty {
        F32 => plain::<4>(bytes, out, f32::from_le_bytes),
        F16 => plain::<2>(bytes, out, |b| f16::from_le_bytes(b).to_f32()),
        BF16 => plain::<2>(bytes, out, |b| bf16_to_f32(u16::from_le_bytes(b))),
        F64 => plain::<8>(bytes, out, |b| f64::from_le_bytes(b) as f32),
        I8 => plain::<1>(bytes, out, |b| f32::from(i8::from_le_bytes(b))),
        I16 => plain::<2>(bytes, out, |b| f32::from(i16::from_le_bytes(b))),
        I32 => plain::<4>(bytes, out, |b| i32::from_le_bytes(b) as f32),
        Q4_0 => q4_0(bytes, out),
        Q4_1 => q4_1(bytes, out),
        Q5_0 => q5_0(bytes, out),
        Q5_1 => q5_1(bytes, out),
        Q8_0 => q8_0(bytes, out),
        Q8_1 => q8_1(bytes, out),
        Q2K => q2_k(bytes, out),
        Q3K => q3_k(bytes, out),
        Q4K => q4_k(bytes, out),
        Q5K => q5_k(bytes, out),
        Q6K => q6_k(bytes, out),
        Q8K => q8_k(bytes, out),
        _ => {
            return Err(GgufError::UnsupportedType {
                tensor: tensor.to_string(),
                ggml_type: ty,
                type_id: ty.id(),
            })
        }
    }
    Ok(())
}

// Block byte sizes, as in `GgmlType::block_layout`.
const QK: usize = 32;
const QK_K: usize = 256;
const Q4_0_BYTES: usize = 18;
const Q4_1_BYTES: usize = 20;
const Q5_0_BYTES: usize = 22;
const Q5_1_BYTES: usize = 24;
const Q8_0_BYTES: usize = 34;
const Q8_1_BYTES: usize = 36;
const Q2_K_BYTES: usize = 84;
const Q3_K_BYTES: usize = 110;
const Q4_K_BYTES: usize = 144;
const Q5_K_BYTES: usize = 176;
const Q6_K_BYTES: usize = 210;
const Q8_K_BYTES: usize = 292;

/// Pairs of (input block, output block) as fixed-size arrays. The caller has
/// checked that both slices hold the same whole number of blocks.
fn blocks<'a, const B: usize, const N: usize>(
    bytes: &'a [u8],
    out: &'a mut [f32],
) -> impl Iterator<Item = (&'a [u8; B], &'a mut [f32; N])> + 'a {
    let input = bytes
        .chunks_exact(B)
        .filter_map(|c| <&[u8; B]>::try_from(c).ok());
    let output = out
        .chunks_exact_mut(N)
        .filter_map(|c| <&mut [f32; N]>::try_from(c).ok());
    input.zip(output)
}

#[inline(always)]
fn f16_le(lo: u8, hi: u8) -> f32 {
    f16::from_le_bytes([lo, hi]).to_f32()
}

#[inline(always)]
fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

fn plain<const B: usize>(bytes: &[u8], out: &mut [f32], conv: impl Fn([u8; B]) -> f32) {
    for (b, o) in blocks::<B, 1>(bytes, out) {
        o[0] = conv(*b);
    }
}

fn q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in blocks::<Q4_0_BYTES, QK>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        for j in 0..QK / 2 {
            let q = b[2 + j];
            o[j] = f32::from(i16::from(q & 0x0f) - 8) * d;
            o[j + QK / 2] = f32::from(i16::from(q >> 4) - 8) * d;
        }
    }
}

fn q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in blocks::<Q4_1_BYTES, QK>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        for j in 0..QK / 2 {
            let q = b[4 + j];
            o[j] = f32::from(q & 0x0f) * d + m;
            o[j + QK / 2] = f32::from(q >> 4) * d + m;
        }
    }
}

fn q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in blocks::<Q5_0_BYTES, QK>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        for j in 0..QK / 2 {
            let q = b[6 + j];
            let lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            o[j] = f32::from(i16::from(lo) - 16) * d;
            o[j + QK / 2] = f32::from(i16::from(hi) - 16) * d;
        }
    }
}

fn q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in blocks::<Q5_1_BYTES, QK>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let m = f16_le(b[2], b[3]);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        for j in 0..QK / 2 {
            let q = b[8 + j];
            let lo = (q & 0x0f) | ((((qh >> j) & 1) as u8) << 4);
            let hi = (q >> 4) | ((((qh >> (j + 16)) & 1) as u8) << 4);
            o[j] = f32::from(lo) * d + m;
            o[j + QK / 2] = f32::from(hi) * d + m;
        }
    }
}

fn q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, o) in blocks::<Q8_0_BYTES, QK>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        for j in 0..QK {
            o[j] = f32::from(b[2 + j] as i8) * d;
        }
    }
}

fn q8_1(bytes: &[u8], out: &mut [f32]) {
    // d (f16), s = d * sum(q) (f16, unused here), 32 x i8.
    for (b, o) in blocks::<Q8_1_BYTES, QK>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        for j in 0..QK {
            o[j] = f32::from(b[4 + j] as i8) * d;
        }
    }
}

fn q8_k(bytes: &[u8], out: &mut [f32]) {
    // d (f32), 256 x i8, 16 x i16 block sums (unused here).
    for (b, o) in blocks::<Q8_K_BYTES, QK_K>(bytes, out) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        for j in 0..QK_K {
            o[j] = f32::from(b[4 + j] as i8) * d;
        }
    }
}

fn q2_k(bytes: &[u8], out: &mut [f32]) {
    // scales[16] (low nibble: scale, high nibble: min), qs[64] (2 bits), d, dmin.
    for (b, o) in blocks::<Q2_K_BYTES, QK_K>(bytes, out) {
        let d = f16_le(b[80], b[81]);
        let dmin = f16_le(b[82], b[83]);
        for n in 0..2 {
            for j in 0..4 {
                let shift = 2 * j;
                for half in 0..2 {
                    let sc = b[n * 8 + j * 2 + half];
                    let dl = d * f32::from(sc & 0x0f);
                    let ml = dmin * f32::from(sc >> 4);
                    for l in half * 16..half * 16 + 16 {
                        let q = (b[16 + n * 32 + l] >> shift) & 3;
                        o[n * 128 + j * 32 + l] = dl * f32::from(q) - ml;
                    }
                }
            }
        }
    }
}

fn q3_k(bytes: &[u8], out: &mut [f32]) {
    // hmask[32], qs[64] (low 2 bits), scales[12] (16 x 6 bits), d.
    for (b, o) in blocks::<Q3_K_BYTES, QK_K>(bytes, out) {
        let d = f16_le(b[108], b[109]);
        let s = &b[96..108];
        let mut dl = [0f32; 16];
        for (i, dl) in dl.iter_mut().enumerate() {
            let low = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
            let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
            let scale = i16::from(low | (high << 4)) - 32;
            *dl = d * f32::from(scale);
        }
        for n in 0..2 {
            for j in 0..4 {
                let m = n * 4 + j;
                let shift = 2 * j;
                for half in 0..2 {
                    let scale = dl[m * 2 + half];
                    for l in half * 16..half * 16 + 16 {
                        let low = (b[32 + n * 32 + l] >> shift) & 3;
                        let high_set = (b[l] >> m) & 1 != 0;
                        let q = i16::from(low) - if high_set { 0 } else { 4 };
                        o[n * 128 + j * 32 + l] = scale * f32::from(q);
                    }
                }
            }
        }
    }
}

/// Scale and min of sub-block `j` (0..8) from the 12 packed bytes of Q4_K/Q5_K.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn k4_scales(b: &[u8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    s.copy_from_slice(&b[4..16]);
    s
}

fn q4_k(bytes: &[u8], out: &mut [f32]) {
    // d, dmin, scales[12], qs[128]: 8 sub-blocks of 32.
    for (b, o) in blocks::<Q4_K_BYTES, QK_K>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let s = k4_scales(b);
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &s);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &s);
            let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for l in 0..32 {
                let q = b[16 + c * 32 + l];
                o[c * 64 + l] = d1 * f32::from(q & 0x0f) - min1;
                o[c * 64 + 32 + l] = d2 * f32::from(q >> 4) - min2;
            }
        }
    }
}

fn q5_k(bytes: &[u8], out: &mut [f32]) {
    // d, dmin, scales[12], qh[32] (bit k: sub-block k), qs[128].
    for (b, o) in blocks::<Q5_K_BYTES, QK_K>(bytes, out) {
        let d = f16_le(b[0], b[1]);
        let dmin = f16_le(b[2], b[3]);
        let s = k4_scales(b);
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, &s);
            let (sc2, m2) = scale_min_k4(2 * c + 1, &s);
            let (d1, min1) = (d * f32::from(sc1), dmin * f32::from(m1));
            let (d2, min2) = (d * f32::from(sc2), dmin * f32::from(m2));
            for l in 0..32 {
                let q = b[48 + c * 32 + l];
                let h = b[16 + l];
                let lo = (q & 0x0f) | (((h >> (2 * c)) & 1) << 4);
                let hi = (q >> 4) | (((h >> (2 * c + 1)) & 1) << 4);
                o[c * 64 + l] = d1 * f32::from(lo) - min1;
                o[c * 64 + 32 + l] = d2 * f32::from(hi) - min2;
            }
        }
    }
}

fn q6_k(bytes: &[u8], out: &mut [f32]) {
    // ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] (i8), d.
    for (b, o) in blocks::<Q6_K_BYTES, QK_K>(bytes, out) {
        let d = f16_le(b[208], b[209]);
        let mut ds = [0f32; 16];
        for (i, ds) in ds.iter_mut().enumerate() {
            *ds = d * f32::from(b[192 + i] as i8);
        }
        for h in 0..2 {
            let ql = h * 64;
            let qh = 128 + h * 32;
            for l in 0..32 {
                let a = b[ql + l];
                let c = b[ql + 32 + l];
                let hb = b[qh + l];
                let q1 = i16::from((a & 0x0f) | ((hb & 3) << 4)) - 32;
                let q2 = i16::from((c & 0x0f) | (((hb >> 2) & 3) << 4)) - 32;
                let q3 = i16::from((a >> 4) | (((hb >> 4) & 3) << 4)) - 32;
                let q4 = i16::from((c >> 4) | ((hb >> 6) << 4)) - 32;
                let is = h * 8 + l / 16;
                let base = h * 128 + l;
                o[base] = ds[is] * f32::from(q1);
                o[base + 32] = ds[is + 2] * f32::from(q2);
                o[base + 64] = ds[is + 4] * f32::from(q3);
                o[base + 96] = ds[is + 6] * f32::from(q4);
            }
        }
    }
}

#[cfg(test)]
pub(super) const KERNEL_LAYOUTS: &[(GgmlType, usize, usize)] = &[
    (GgmlType::Q4_0, QK, Q4_0_BYTES),
    (GgmlType::Q4_1, QK, Q4_1_BYTES),
    (GgmlType::Q5_0, QK, Q5_0_BYTES),
    (GgmlType::Q5_1, QK, Q5_1_BYTES),
    (GgmlType::Q8_0, QK, Q8_0_BYTES),
    (GgmlType::Q8_1, QK, Q8_1_BYTES),
    (GgmlType::Q2K, QK_K, Q2_K_BYTES),
    (GgmlType::Q3K, QK_K, Q3_K_BYTES),
    (GgmlType::Q4K, QK_K, Q4_K_BYTES),
    (GgmlType::Q5K, QK_K, Q5_K_BYTES),
    (GgmlType::Q6K, QK_K, Q6_K_BYTES),
    (GgmlType::Q8K, QK_K, Q8_K_BYTES),
];
