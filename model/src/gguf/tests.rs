//! Unit tests of the GGUF reader on hand-built files and hand-checked values.
//! Cross-checks against the `gguf` Python package live in `model/tests/gguf.rs`.

use super::*;
use std::sync::atomic::{AtomicU64, Ordering};

/// A minimal GGUF writer for crafting valid and corrupt files.
struct Builder {
    version: u32,
    alignment: u64,
    n_kv: u64,
    kv: Vec<u8>,
    n_tensors: u64,
    infos: Vec<u8>,
    data: Vec<u8>,
}

fn gguf_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
}

impl Builder {
    fn new() -> Self {
        Builder {
            version: 3,
            alignment: 32,
            n_kv: 0,
            kv: Vec::new(),
            n_tensors: 0,
            infos: Vec::new(),
            data: Vec::new(),
        }
    }

    /// Add a key with a raw value type and payload.
    fn kv_raw(&mut self, key: &[u8], ty: u32, payload: &[u8]) -> &mut Self {
        gguf_str(&mut self.kv, key);
        self.kv.extend_from_slice(&ty.to_le_bytes());
        self.kv.extend_from_slice(payload);
        self.n_kv += 1;
        self
    }

    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv_raw(key.as_bytes(), 4, &v.to_le_bytes())
    }

    fn kv_str(&mut self, key: &str, v: &str) -> &mut Self {
        let mut p = Vec::new();
        gguf_str(&mut p, v.as_bytes());
        self.kv_raw(key.as_bytes(), 8, &p)
    }

    fn alignment(&mut self, a: u32) -> &mut Self {
        self.alignment = u64::from(a);
        self.kv_u32("general.alignment", a)
    }

    /// Add a tensor whose data is appended (aligned) to the data section.
    fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, data: &[u8]) -> &mut Self {
        while !(self.data.len() as u64).is_multiple_of(self.alignment) {
            self.data.push(0);
        }
        let offset = self.data.len() as u64;
        self.data.extend_from_slice(data);
        self.tensor_info(name, dims, type_id, offset)
    }

    fn tensor_info(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        gguf_str(&mut self.infos, name.as_bytes());
        self.infos
            .extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            self.infos.extend_from_slice(&d.to_le_bytes());
        }
        self.infos.extend_from_slice(&type_id.to_le_bytes());
        self.infos.extend_from_slice(&offset.to_le_bytes());
        self.n_tensors += 1;
        self
    }

    fn build(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.n_tensors.to_le_bytes());
        out.extend_from_slice(&self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kv);
        out.extend_from_slice(&self.infos);
        while !(out.len() as u64).is_multiple_of(self.alignment) {
            out.push(0);
        }
        out.extend_from_slice(&self.data);
        out
    }
}

/// A file in the temp dir that is removed when dropped.
struct TempFile(PathBuf);

impl TempFile {
    fn new(bytes: &[u8]) -> TempFile {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("tessera-gguf-unit-{}-{n}.gguf", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, GgufError> {
    let f = TempFile::new(bytes);
    GgufFile::open(&f.0)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn q8_0_block(d: f32, qs: [i8; 32]) -> Vec<u8> {
    let mut b = half::f16::from_f32(d).to_le_bytes().to_vec();
    b.extend(qs.iter().map(|&q| q as u8));
    b
}

fn sample_file() -> Builder {
    let mut b = Builder::new();
    b.kv_str("general.architecture", "llama")
        .kv_u32("llama.block_count", 2);
    b.tensor("a", &[3, 2], 0, &f32_bytes(&[1., 2., 3., 4., 5., 6.]));
    let qs: [i8; 32] = std::array::from_fn(|i| i as i8 - 16);
    let mut q = q8_0_block(0.5, qs);
    q.extend(q8_0_block(-2.0, qs));
    b.tensor("q", &[32, 2], 8, &q);
    b
}

#[test]
fn ggml_type_ids_round_trip() {
    for id in 0..64 {
        let ty = GgmlType::from_id(id);
        assert_eq!(ty.id(), id);
        if matches!(ty, GgmlType::Unknown(_)) {
            assert!(ty.block_layout().is_none());
            assert!(!ty.can_dequantize());
        } else {
            assert!(ty.block_layout().is_some(), "{ty:?}");
        }
    }
    assert_eq!(GgmlType::from_id(12), GgmlType::Q4K);
    assert_eq!(GgmlType::Q4K.name(), "Q4_K");
    assert_eq!(GgmlType::from_id(4), GgmlType::Unknown(4));
    assert_eq!(GgmlType::BF16.id(), 30);
    assert_eq!(GgmlType::Q6K.block_layout(), Some((256, 210)));
    assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
    assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
}

#[test]
fn kernel_layouts_match_type_table() {
    for &(ty, elems, bytes) in dequant::KERNEL_LAYOUTS {
        assert_eq!(
            ty.block_layout(),
            Some((elems as u64, bytes as u64)),
            "{ty:?}"
        );
        assert!(ty.can_dequantize());
    }
}

#[test]
fn meta_value_accessors() {
    assert_eq!(MetaValue::U8(7).as_u64(), Some(7));
    assert_eq!(MetaValue::I32(-1).as_u64(), None);
    assert_eq!(MetaValue::I64(5).as_u64(), Some(5));
    assert_eq!(MetaValue::Bool(true).as_u64(), None);
    assert_eq!(MetaValue::F32(1.0).as_u64(), None);
    assert_eq!(MetaValue::U64(u64::MAX).as_i64(), None);
    assert_eq!(MetaValue::I16(-3).as_i64(), Some(-3));
    assert_eq!(MetaValue::U32(3).as_f64(), Some(3.0));
    assert_eq!(MetaValue::I8(-3).as_f64(), Some(-3.0));
    assert_eq!(MetaValue::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(MetaValue::Bool(true).as_f64(), None);
    assert_eq!(MetaValue::String("x".into()).as_str(), Some("x"));
    assert_eq!(MetaValue::U8(1).as_bool(), None);
    assert_eq!(MetaValue::Bool(false).as_bool(), Some(false));
    let arr = MetaValue::Array(vec![MetaValue::U8(1)]);
    assert_eq!(arr.as_array().map(<[MetaValue]>::len), Some(1));
    assert_eq!(arr.as_str(), None);
}

#[test]
fn unpermute_qk_hand_checked() {
    // 2 heads, head_dim 4, 2 columns. Row r holds [10r, 10r + 1].
    let w: Vec<f32> = (0..8)
        .flat_map(|r| [10.0 * r as f32, 10.0 * r as f32 + 1.0])
        .collect();
    let out = unpermute_qk(&w, 2, 2);
    // Within each head, rows (0, 1, 2, 3) -> (0, 2, 1, 3): the even rows, then the odd rows.
    let rows = [0, 2, 1, 3, 4, 6, 5, 7];
    let expected: Vec<f32> = rows
        .iter()
        .flat_map(|&r| [10.0 * r as f32, 10.0 * r as f32 + 1.0])
        .collect();
    assert_eq!(out, expected);

    // A bias (cols = 1), one head of dim 6: [x0 x3 x1 x4 x2 x5] -> [x0 x1 x2 x3 x4 x5].
    let permuted = [0., 3., 1., 4., 2., 5.];
    assert_eq!(unpermute_qk(&permuted, 1, 1), vec![0., 1., 2., 3., 4., 5.]);

    // Applying llama.cpp's permutation (reshape [h, 2, hd/2] -> swap -> [h, hd/2, 2]) and
    // then unpermute_qk gives back the original.
    let (heads, hd, cols) = (3, 8, 5);
    let orig: Vec<f32> = (0..heads * hd * cols).map(|i| i as f32).collect();
    let mut perm = vec![0f32; orig.len()];
    for h in 0..heads {
        for half in 0..2 {
            for i in 0..hd / 2 {
                let src = h * hd + half * (hd / 2) + i;
                let dst = h * hd + 2 * i + half;
                perm[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&orig[src * cols..(src + 1) * cols]);
            }
        }
    }
    assert_eq!(unpermute_qk(&perm, heads, cols), orig);
}

#[test]
fn try_unpermute_qk_rejects_bad_shapes() {
    assert!(matches!(
        try_unpermute_qk(&[0.0; 8], 0, 1),
        Err(GgufError::BadShape(_))
    ));
    assert!(matches!(
        try_unpermute_qk(&[0.0; 8], 1, 0),
        Err(GgufError::BadShape(_))
    ));
    assert!(matches!(
        try_unpermute_qk(&[0.0; 9], 3, 1),
        Err(GgufError::BadShape(_))
    ));
    assert!(matches!(
        try_unpermute_qk(&[0.0; 12], 2, 2),
        Err(GgufError::BadShape(_))
    ));
    assert_eq!(try_unpermute_qk(&[], 2, 2).unwrap(), Vec::<f32>::new());
}

#[test]
#[should_panic(expected = "unpermute_qk")]
fn unpermute_qk_panics_on_bad_shape() {
    unpermute_qk(&[0.0; 6], 4, 1);
}

#[test]
fn dequantize_plain_and_q8_types_by_hand() {
    let mut out = [0f32; 3];
    let bytes: Vec<u8> = [1.0f32, -2.5, 0.0]
        .iter()
        .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
        .collect();
    dequantize_into(GgmlType::BF16, &bytes, &mut out).unwrap();
    assert_eq!(out, [1.0, -2.5, 0.0]);

    dequantize_into(GgmlType::I8, &[0xff, 3, 0x80], &mut out).unwrap();
    assert_eq!(out, [-1.0, 3.0, -128.0]);

    // Q8_K: f32 d, 256 x i8, 16 x i16 sums.
    let mut q8k = 0.25f32.to_le_bytes().to_vec();
    q8k.extend((0..256i32).map(|i| (i - 128) as i8 as u8));
    q8k.extend([0u8; 32]);
    let mut out = vec![0f32; 256];
    dequantize_into(GgmlType::Q8K, &q8k, &mut out).unwrap();
    for (i, &v) in out.iter().enumerate() {
        assert_eq!(v, (i as f32 - 128.0) * 0.25);
    }

    // Q8_1: f16 d, f16 s, 32 x i8.
    let mut q81 = half::f16::from_f32(2.0).to_le_bytes().to_vec();
    q81.extend(half::f16::from_f32(0.0).to_le_bytes());
    q81.extend((0..32).map(|i| (i as i8 - 5) as u8));
    let mut out = vec![0f32; 32];
    dequantize_into(GgmlType::Q8_1, &q81, &mut out).unwrap();
    for (i, &v) in out.iter().enumerate() {
        assert_eq!(v, (i as f32 - 5.0) * 2.0);
    }

    // Q4_0 by hand: d = 0.5, byte j holds element j (low) and j + 16 (high).
    let mut q40 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q40.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut out = vec![0f32; 32];
    dequantize_into(GgmlType::Q4_0, &q40, &mut out).unwrap();
    for j in 0..16 {
        assert_eq!(out[j], (j as f32 - 8.0) * 0.5);
        assert_eq!(out[j + 16], (7.0 - j as f32) * 0.5);
    }
}

#[test]
fn dequantize_into_rejects_bad_sizes() {
    let mut out = vec![0f32; 32];
    let err = dequantize_into(GgmlType::Q8_0, &[0u8; 33], &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::SizeMismatch {
                expected: 34,
                got: 33,
                ..
            }
        ),
        "{err}"
    );
    let mut out = vec![0f32; 31];
    let err = dequantize_into(GgmlType::Q8_0, &[0u8; 34], &mut out).unwrap_err();
    assert!(matches!(err, GgufError::BadShape(_)), "{err}");
    let mut out = vec![0f32; 256];
    let err = dequantize_into(GgmlType::IQ2XXS, &[0u8; 66], &mut out).unwrap_err();
    assert!(
        matches!(err, GgufError::UnsupportedType { type_id: 16, .. }),
        "{err}"
    );
    let err = dequantize_into(GgmlType::Unknown(77), &[], &mut []).unwrap_err();
    assert!(
        matches!(err, GgufError::UnknownType { type_id: 77, .. }),
        "{err}"
    );
    dequantize_into(GgmlType::Q4K, &[], &mut []).unwrap();
}

#[test]
fn opens_a_built_file() {
    let bytes = sample_file().build();
    let f = open_bytes(&bytes).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    assert_eq!(f.data_offset() % 32, 0);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_f64("llama.block_count").unwrap(), 2.0);
    assert_eq!(f.tensors().len(), 2);
    let a = f.tensor("a").unwrap();
    assert_eq!(a.dims, vec![3, 2]);
    assert_eq!(a.shape(), vec![2, 3]);
    assert_eq!(a.n_elements(), 6);
    assert_eq!(f.dequantize("a").unwrap(), vec![1., 2., 3., 4., 5., 6.]);
    assert_eq!(f.dequantize_rows("a", 1, 2).unwrap(), vec![4., 5., 6.]);
    assert_eq!(f.dequantize_rows("a", 2, 2).unwrap(), Vec::<f32>::new());
    assert_eq!(f.tensor_data("a").unwrap().len(), 24);
    let q = f.dequantize("q").unwrap();
    assert_eq!(q.len(), 64);
    assert_eq!(q[0], -8.0);
    assert_eq!(q[32], 32.0);
    assert_eq!(f.dequantize_rows("q", 1, 2).unwrap(), q[32..].to_vec());
    assert!(format!("{f:?}").contains("n_tensors: 2"));
}

#[test]
fn typed_getters_name_key_and_type() {
    let f = open_bytes(&sample_file().build()).unwrap();
    let err = f.get_u64("missing.key").unwrap_err();
    assert!(matches!(&err, GgufError::MissingKey { key, .. } if key == "missing.key"));
    assert!(err.to_string().contains("missing.key"));
    let err = f.get_u64("general.architecture").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GgufError::WrongType { .. }));
    assert!(
        msg.contains("general.architecture") && msg.contains("integer") && msg.contains("string"),
        "{msg}"
    );
    let err = f.get_str("llama.block_count").unwrap_err();
    assert!(err.to_string().contains("u32 2"), "{err}");
    assert!(f.get_bool("llama.block_count").is_err());
    assert!(f.get_array("llama.block_count").is_err());
    assert_eq!(f.get_i64("llama.block_count").unwrap(), 2);
}

#[test]
fn row_range_errors() {
    let f = open_bytes(&sample_file().build()).unwrap();
    let err = f.dequantize_rows("a", 1, 3).unwrap_err();
    assert!(
        matches!(err, GgufError::RowRangeOutOfBounds { rows: 2, .. }),
        "{err}"
    );
    assert!(matches!(
        f.dequantize_rows("a", 2, 1),
        Err(GgufError::RowRangeOutOfBounds { .. })
    ));
    assert!(matches!(
        f.dequantize_rows("nope", 0, 1),
        Err(GgufError::TensorNotFound(_))
    ));
    assert!(matches!(
        f.tensor_data("nope"),
        Err(GgufError::TensorNotFound(_))
    ));

    // A 1-D Q8_0 tensor: rows are single elements, so only block-aligned ranges work.
    let mut b = Builder::new();
    b.tensor(
        "v",
        &[64],
        8,
        &[q8_0_block(1.0, [1; 32]), q8_0_block(2.0, [1; 32])].concat(),
    );
    let f = open_bytes(&b.build()).unwrap();
    assert_eq!(f.dequantize_rows("v", 32, 64).unwrap(), vec![2.0; 32]);
    let err = f.dequantize_rows("v", 1, 32).unwrap_err();
    assert!(matches!(err, GgufError::RowRangeUnaligned { .. }), "{err}");
}

#[test]
fn zero_dim_and_empty_tensors() {
    let mut b = Builder::new();
    b.tensor("scalar", &[], 0, &f32_bytes(&[7.0]));
    b.tensor("empty", &[4, 0], 0, &[]);
    let f = open_bytes(&b.build()).unwrap();
    let s = f.tensor("scalar").unwrap();
    assert_eq!(s.n_elements(), 1);
    assert!(s.shape().is_empty());
    assert_eq!(f.dequantize("scalar").unwrap(), vec![7.0]);
    assert_eq!(f.dequantize_rows("scalar", 0, 1).unwrap(), vec![7.0]);
    assert_eq!(f.dequantize("empty").unwrap(), Vec::<f32>::new());
    assert_eq!(f.dequantize_rows("empty", 0, 0).unwrap(), Vec::<f32>::new());
}

#[test]
fn honours_general_alignment_and_v2() {
    let mut b = Builder::new();
    b.version = 2;
    b.alignment(64);
    b.tensor("a", &[2], 0, &f32_bytes(&[1.0, 2.0]));
    b.tensor("b", &[3], 0, &f32_bytes(&[3.0, 4.0, 5.0]));
    let f = open_bytes(&b.build()).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.data_offset() % 64, 0);
    assert_eq!(f.tensor("b").unwrap().offset, 64);
    assert_eq!(f.dequantize("b").unwrap(), vec![3.0, 4.0, 5.0]);
}

#[test]
fn header_errors() {
    assert!(matches!(open_bytes(b""), Err(GgufError::Truncated { .. })));
    assert!(matches!(
        open_bytes(b"GG"),
        Err(GgufError::Truncated { .. })
    ));
    assert!(matches!(open_bytes(b"PK"), Err(GgufError::BadMagic { .. })));
    assert!(matches!(
        open_bytes(b"not a gguf file"),
        Err(GgufError::BadMagic { .. })
    ));
    let mut b = Builder::new();
    b.version = 1;
    assert!(matches!(
        open_bytes(&b.build()),
        Err(GgufError::UnsupportedVersion { version: 1, .. })
    ));
    b.version = 4;
    assert!(matches!(
        open_bytes(&b.build()),
        Err(GgufError::UnsupportedVersion { version: 4, .. })
    ));
    b.version = 3u32.swap_bytes();
    assert!(matches!(
        open_bytes(&b.build()),
        Err(GgufError::BigEndian { .. })
    ));

    let missing = std::env::temp_dir().join("tessera-gguf-definitely-missing.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }));
    assert!(
        err.to_string()
            .contains("tessera-gguf-definitely-missing.gguf"),
        "{err}"
    );
    let err = GgufFile::open(std::env::temp_dir()).unwrap_err();
    assert!(matches!(err, GgufError::Io { .. }), "{err}");
}

#[test]
fn corrupt_counts_do_not_allocate() {
    // A header claiming 2^62 metadata entries / tensors.
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((1u64 << 62).to_le_bytes());
    let err = open_bytes(&bytes).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { .. }), "{err}");
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    assert!(matches!(
        open_bytes(&bytes),
        Err(GgufError::Truncated { .. })
    ));

    // An array claiming u64::MAX elements, and a string claiming u64::MAX bytes.
    let mut payload = 5u32.to_le_bytes().to_vec();
    payload.extend(u64::MAX.to_le_bytes());
    let mut b = Builder::new();
    b.kv_raw(b"huge.array", 9, &payload);
    let err = open_bytes(&b.build()).unwrap_err();
    assert!(
        matches!(&err, GgufError::Truncated { what, .. } if what.contains("huge.array")),
        "{err}"
    );
    let mut b = Builder::new();
    b.kv_raw(b"huge.string", 8, &u64::MAX.to_le_bytes());
    let err = open_bytes(&b.build()).unwrap_err();
    assert!(
        matches!(&err, GgufError::Truncated { what, .. } if what.contains("huge.string")),
        "{err}"
    );
    // An array of 2^40 nested arrays.
    let mut payload = 9u32.to_le_bytes().to_vec();
    payload.extend((1u64 << 40).to_le_bytes());
    let mut b = Builder::new();
    b.kv_raw(b"huge.nested", 9, &payload);
    assert!(matches!(
        open_bytes(&b.build()),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn corrupt_structures_are_errors() {
    fn corrupt(b: &Builder, needle: &str) {
        match open_bytes(&b.build()) {
            Err(GgufError::Corrupt { what, .. }) => assert!(what.contains(needle), "{what}"),
            other => panic!("expected a Corrupt error mentioning {needle:?}, got {other:?}"),
        }
    }
    // Deeply nested arrays.
    let mut payload = Vec::new();
    for _ in 0..100 {
        payload.extend(9u32.to_le_bytes());
        payload.extend(1u64.to_le_bytes());
    }
    payload.extend(0u32.to_le_bytes());
    payload.extend(0u64.to_le_bytes());
    let mut b = Builder::new();
    b.kv_raw(b"deep", 9, &payload);
    corrupt(&b, "deep");
    // Unknown value type.
    let mut b = Builder::new();
    b.kv_raw(b"weird", 13, &[0; 8]);
    corrupt(&b, "unknown metadata value type 13");
    // Array of an unknown value type.
    let mut payload = 99u32.to_le_bytes().to_vec();
    payload.extend(0u64.to_le_bytes());
    let mut b = Builder::new();
    b.kv_raw(b"weird.array", 9, &payload);
    corrupt(&b, "unknown value type 99");
    // Duplicate key, duplicate tensor.
    let mut b = Builder::new();
    b.kv_u32("k", 1).kv_u32("k", 2);
    corrupt(&b, "'k' appears twice");
    let mut b = Builder::new();
    b.tensor("t", &[1], 0, &f32_bytes(&[1.0]));
    b.tensor("t", &[1], 0, &f32_bytes(&[1.0]));
    corrupt(&b, "'t' appears twice");
    // Invalid UTF-8 in a key.
    let mut b = Builder::new();
    b.kv_raw(b"bad\xff", 4, &1u32.to_le_bytes());
    corrupt(&b, "UTF-8");
    // Bad alignment values.
    let mut b = Builder::new();
    b.kv_u32("general.alignment", 0);
    corrupt(&b, "general.alignment");
    let mut b = Builder::new();
    b.kv_u32("general.alignment", 48);
    corrupt(&b, "general.alignment");
    let mut b = Builder::new();
    b.kv_str("general.alignment", "32");
    corrupt(&b, "general.alignment");
    // Misaligned tensor offset.
    let mut b = Builder::new();
    b.tensor_info("t", &[1], 0, 4);
    b.data = vec![0; 64];
    corrupt(&b, "not a multiple of the alignment");
    // Too many dimensions, overflowing dimensions.
    let mut b = Builder::new();
    b.tensor_info("t", &[1; 9], 0, 0);
    corrupt(&b, "9 dimensions");
    let mut b = Builder::new();
    b.tensor_info("t", &[1 << 40, 1 << 40], 0, 0);
    corrupt(&b, "overflows");
    // A quantized tensor whose rows are not whole blocks.
    let mut b = Builder::new();
    b.tensor("t", &[16, 2], 8, &[0; 34]);
    corrupt(&b, "block size");
}

#[test]
fn invalid_utf8_values_are_kept_lossily() {
    let mut p = Vec::new();
    gguf_str(&mut p, b"a\xffb");
    let mut b = Builder::new();
    b.kv_raw(b"s", 8, &p);
    let f = open_bytes(&b.build()).unwrap();
    assert_eq!(f.get_str("s").unwrap(), "a\u{fffd}b");
}

#[test]
fn tensor_data_past_end_names_the_tensor() {
    let mut b = Builder::new();
    b.tensor("fits", &[2], 0, &f32_bytes(&[1.0, 2.0]));
    b.tensor_info("too.long", &[1000], 0, 32);
    let err = open_bytes(&b.build()).unwrap_err();
    match &err {
        GgufError::TensorDataOutOfBounds { tensor, .. } => assert_eq!(tensor, "too.long"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("too.long"));
    // Offsets near u64::MAX must not overflow.
    let mut b = Builder::new();
    b.tensor_info("far", &[1], 0, u64::MAX - 31);
    assert!(matches!(
        open_bytes(&b.build()),
        Err(GgufError::TensorDataOutOfBounds { .. })
    ));
}

#[test]
fn unknown_ggml_type_is_listed_but_not_readable() {
    let mut b = Builder::new();
    b.tensor("mystery", &[32], 77, &[0; 32]);
    b.tensor("iq", &[256], 16, &[0; 66]);
    let f = open_bytes(&b.build()).unwrap();
    assert_eq!(
        f.tensor("mystery").unwrap().ggml_type,
        GgmlType::Unknown(77)
    );
    let err = f.tensor_data("mystery").unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("mystery") && msg.contains("77"), "{msg}");
    assert!(matches!(
        f.dequantize("mystery"),
        Err(GgufError::UnknownType { type_id: 77, .. })
    ));
    // Known but not dequantizable: raw data is available, dequantization is an error.
    assert_eq!(f.tensor_data("iq").unwrap().len(), 66);
    let err = f.dequantize("iq").unwrap_err();
    assert!(
        matches!(&err, GgufError::UnsupportedType { tensor, type_id: 16, .. } if tensor == "iq"),
        "{err}"
    );
    assert!(matches!(
        f.dequantize_rows("iq", 0, 1),
        Err(GgufError::UnsupportedType { .. })
    ));
}

#[test]
fn truncations_and_bit_flips_never_panic() {
    let mut b = sample_file();
    let mut arr = 8u32.to_le_bytes().to_vec();
    arr.extend(2u64.to_le_bytes());
    gguf_str(&mut arr, b"x");
    gguf_str(&mut arr, b"yz");
    b.kv_raw(b"strs", 9, &arr);
    let bytes = b.build();
    let last_data_end = bytes.len();
    for cut in 0..last_data_end {
        assert!(open_bytes(&bytes[..cut]).is_err(), "cut at {cut} opened");
    }
    // Deterministic pseudo-random byte corruption: any outcome but a panic is fine.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..1500 {
        let mut m = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % m.len() as u64) as usize;
            m[i] = next() as u8;
        }
        if let Ok(f) = open_bytes(&m) {
            for t in f.tensors().to_vec() {
                let _ = f.tensor_data(&t.name);
                let _ = f.dequantize(&t.name);
                let _ = f.dequantize_rows(&t.name, 0, 1);
            }
        }
    }
}
