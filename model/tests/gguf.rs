//! The GGUF reader against the `gguf` Python package (llama.cpp's reference
//! implementation): fixtures made by `tests/fixtures/make_gguf_fixtures.py`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tessera_model::gguf::{dequantize_into, GgmlType, GgufError, GgufFile, MetaValue};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture() -> Value {
    let text = std::fs::read_to_string(fixtures_dir().join("dequant.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn hex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2));
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex_f32(s: &str) -> Vec<f32> {
    hex(s)
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn tmp_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", std::process::id()))
}

/// Equal as f32 values (the reference computes in f32 with the same operation order).
fn assert_same(got: &[f32], expected: &[f32], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length");
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        assert!(g == e, "{what}[{i}]: got {g}, expected {e}");
    }
}

#[test]
fn dequantizers_match_gguf_python() {
    let fx = fixture();
    let cases = fx["dequant"].as_object().unwrap();
    for name in [
        "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
        "Q5_K", "Q6_K",
    ] {
        let case = &cases[name];
        let ty = GgmlType::from_id(case["type_id"].as_u64().unwrap() as u32);
        assert_eq!(ty.name(), name);
        let bytes = hex(case["bytes"].as_str().unwrap());
        let expected = hex_f32(case["expected_f32le"].as_str().unwrap());
        let n = case["n"].as_u64().unwrap() as usize;
        assert_eq!(expected.len(), n);
        let mut out = vec![f32::NAN; n];
        dequantize_into(ty, &bytes, &mut out).unwrap();
        assert_same(&out, &expected, name);

        // Block by block gives the same values.
        let (block, size) = ty.block_layout().unwrap();
        let (block, size) = (block as usize, size as usize);
        let mut out = vec![f32::NAN; n];
        for (b, o) in bytes.chunks(size).zip(out.chunks_mut(block)) {
            dequantize_into(ty, b, o).unwrap();
        }
        assert_same(&out, &expected, name);
    }
}

#[test]
fn tiny_gguf_from_gguf_writer() {
    let fx = fixture();
    let f = GgufFile::open(fixtures_dir().join("tiny.gguf")).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 32);
    check_tiny(&f, &fx);
}

fn check_tiny(f: &GgufFile, fx: &Value) {
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_str("general.name").unwrap(), "tessera-tiny");
    assert_eq!(f.get("test.u8"), Some(&MetaValue::U8(200)));
    assert_eq!(f.get("test.i8"), Some(&MetaValue::I8(-100)));
    assert_eq!(f.get("test.u16"), Some(&MetaValue::U16(60000)));
    assert_eq!(f.get("test.i16"), Some(&MetaValue::I16(-30000)));
    assert_eq!(f.get("test.u32"), Some(&MetaValue::U32(4_000_000_000)));
    assert_eq!(f.get("test.i32"), Some(&MetaValue::I32(-2_000_000_000)));
    assert_eq!(f.get("test.f32"), Some(&MetaValue::F32(1.5)));
    assert_eq!(f.get("test.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(f.get_str("test.string").unwrap(), "héllo, wörld");
    assert_eq!(f.get("test.u64"), Some(&MetaValue::U64((1 << 40) + 3)));
    assert_eq!(f.get("test.i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(
        f.get("test.f64"),
        Some(&MetaValue::F64(std::f64::consts::PI))
    );
    assert_eq!(f.get_u64("test.u8").unwrap(), 200);
    assert_eq!(f.get_u64("test.u64").unwrap(), (1 << 40) + 3);
    assert!(f.get_u64("test.i8").is_err());
    assert_eq!(f.get_f64("test.f32").unwrap(), 1.5);
    assert_eq!(f.get_f64("test.i32").unwrap(), -2e9);
    assert!(f.get_bool("test.bool").unwrap());

    let strs: Vec<&str> = f
        .get_array("test.str_array")
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strs, ["a", "héllo", "", "<|im_end|>"]);
    assert_eq!(
        f.get("test.i32_array"),
        Some(&MetaValue::Array(vec![
            MetaValue::I32(1),
            MetaValue::I32(-2),
            MetaValue::I32(3)
        ]))
    );
    assert_eq!(
        f.get("test.u8_array"),
        Some(&MetaValue::Array(vec![
            MetaValue::U8(0),
            MetaValue::U8(1),
            MetaValue::U8(255)
        ]))
    );
    assert_eq!(
        f.get("test.f32_array"),
        Some(&MetaValue::Array(vec![
            MetaValue::F32(0.5),
            MetaValue::F32(-1.25)
        ]))
    );
    let nested = f.get_array("test.nested").unwrap();
    assert_eq!(nested.len(), 3);
    assert_eq!(
        nested[0],
        MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(2)])
    );
    assert_eq!(nested[1], MetaValue::Array(vec![MetaValue::I32(3)]));
    assert_eq!(
        nested[2],
        MetaValue::Array(vec![
            MetaValue::String("x".into()),
            MetaValue::String("y".into())
        ])
    );
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 2);
    assert_eq!(f.get_u64("llama.attention.head_count").unwrap(), 4);

    let expected = fx["tiny"].as_object().unwrap();
    let names: Vec<&str> = f.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut expected_names: Vec<&str> = expected.keys().map(String::as_str).collect();
    let mut sorted = names.clone();
    sorted.sort();
    expected_names.sort();
    assert_eq!(sorted, expected_names);
    assert_eq!(names[0], "norm.weight");

    for (name, e) in expected {
        let t = f.tensor(name).unwrap();
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape, "{name}");
        let dims: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        assert_eq!(t.dims, dims, "{name}");
        assert_eq!(
            t.ggml_type.id() as u64,
            e["type_id"].as_u64().unwrap(),
            "{name}"
        );
        assert!(t.offset.is_multiple_of(32));
        let values = hex_f32(e["expected_f32le"].as_str().unwrap());
        assert_eq!(t.n_elements() as usize, values.len());
        assert_eq!(
            f.tensor_data(name).unwrap().len() as u64,
            t.ggml_type.bytes_for(t.n_elements()).unwrap()
        );
        assert_same(&f.dequantize(name).unwrap(), &values, name);

        // Every row range that is block-aligned matches the slice of the whole tensor.
        let rows = shape[0];
        let row_len = values.len() / rows;
        let block = t.ggml_type.block_size().unwrap() as usize;
        for start in 0..=rows {
            for end in start..=rows {
                let got = f.dequantize_rows(name, start, end);
                if (start * row_len).is_multiple_of(block) && (end * row_len).is_multiple_of(block)
                {
                    assert_same(&got.unwrap(), &values[start * row_len..end * row_len], name);
                } else {
                    assert!(
                        matches!(got, Err(GgufError::RowRangeUnaligned { .. })),
                        "{name}"
                    );
                }
            }
        }
        assert!(matches!(
            f.dequantize_rows(name, 0, rows + 1),
            Err(GgufError::RowRangeOutOfBounds { .. })
        ));
    }
    let cube = f.tensor("cube.f32").unwrap();
    assert_eq!(cube.dims, vec![4, 3, 2]);
    assert_eq!(f.dequantize_rows("cube.f32", 1, 2).unwrap()[0], 6.0);
}

#[test]
fn tiny_gguf_as_version_2() {
    let mut bytes = std::fs::read(fixtures_dir().join("tiny.gguf")).unwrap();
    assert_eq!(&bytes[4..8], &3u32.to_le_bytes());
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let path = tmp_path("tiny-v2.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.path(), path);
    check_tiny(&f, &fixture());
    drop(f);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn truncated_tiny_gguf_gives_errors() {
    let bytes = std::fs::read(fixtures_dir().join("tiny.gguf")).unwrap();
    let f = GgufFile::open(fixtures_dir().join("tiny.gguf")).unwrap();
    let data_end = f
        .tensors()
        .iter()
        .map(|t| f.data_offset() + t.offset + t.byte_len().unwrap())
        .max()
        .unwrap() as usize;
    let header_end = f.data_offset() as usize;
    drop(f);
    assert!(data_end <= bytes.len());

    let path = tmp_path("tiny-cut.gguf");
    for cut in 0..bytes.len() {
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let result = GgufFile::open(&path);
        if cut >= data_end {
            // Only trailing padding is missing.
            assert!(result.is_ok(), "cut at {cut}: {:?}", result.err());
            continue;
        }
        let err = match result {
            Ok(_) => panic!("cut at {cut} of {} opened", bytes.len()),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(msg.contains("tiny-cut.gguf"), "cut at {cut}: {msg}");
        match &err {
            GgufError::Truncated { what, .. } => {
                assert!(cut < header_end, "cut at {cut}: {msg}");
                assert!(!what.is_empty());
            }
            GgufError::TensorDataOutOfBounds { tensor, .. } => {
                assert!(cut >= header_end - 31, "cut at {cut}: {msg}");
                assert!(!tensor.is_empty());
            }
            other => panic!("cut at {cut}: unexpected error {other:?}"),
        }
    }
    std::fs::remove_file(&path).unwrap();
}

fn default_model() -> Option<PathBuf> {
    let path = std::env::var("TESSERA_DEFAULT_MODEL")
        .ok()
        .or_else(|| option_env!("TESSERA_DEFAULT_MODEL").map(str::to_string))?;
    let path = PathBuf::from(path);
    let path = if path.is_absolute() {
        path
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
    };
    if path.exists() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: default model {} is not installed (run scripts/setup.sh)",
            path.display()
        );
        None
    }
}

#[test]
fn default_model_opens_and_matches_gguf_python() {
    let Some(path) = default_model() else { return };
    let fx = fixture();
    let reference = &fx["default_model"];
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version(), 3);
    assert_eq!(
        u64::from(f.version()),
        reference["version"].as_u64().unwrap()
    );
    assert_eq!(f.tensors().len(), 272);
    assert_eq!(f.get_u64("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(f.get_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    assert_eq!(f.get_u64("tokenizer.ggml.bos_token_id").unwrap(), 1);

    let emb = f.tensor("token_embd.weight").unwrap();
    assert_eq!(emb.ggml_type, GgmlType::Q8_0);
    assert_eq!(emb.shape(), vec![49152, 576]);
    assert_eq!(emb.dims, vec![576, 49152]);
    for layer in 0..30 {
        for part in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            let t = f.tensor(&format!("blk.{layer}.{part}.weight")).unwrap();
            assert_eq!(t.ggml_type, GgmlType::Q4_1, "{}", t.name);
        }
        let norm = f.tensor(&format!("blk.{layer}.attn_norm.weight")).unwrap();
        assert_eq!(norm.ggml_type, GgmlType::F32);
    }

    for (name, e) in reference["tensors"].as_object().unwrap() {
        let t = f.tensor(name).unwrap();
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(t.shape(), shape, "{name}");
        assert_eq!(u64::from(t.ggml_type.id()), e["type_id"].as_u64().unwrap());
        let cols = shape[1];
        let (values, row0) = match e.get("rows") {
            Some(rows) => {
                let (lo, hi) = (
                    rows[0].as_u64().unwrap() as usize,
                    rows[1].as_u64().unwrap() as usize,
                );
                let v = f.dequantize_rows(name, lo, hi).unwrap();
                assert_eq!(v.len(), (hi - lo) * cols);
                let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
                let expected = e["rows_sum"].as_f64().unwrap();
                assert!(
                    (sum - expected).abs() < 1e-6,
                    "{name} rows sum {sum} vs {expected}"
                );
                (v, lo)
            }
            None => {
                let v = f.dequantize(name).unwrap();
                let sum: f64 = v.iter().map(|&x| f64::from(x)).sum();
                let sum_sq: f64 = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                let (es, esq) = (e["sum"].as_f64().unwrap(), e["sum_sq"].as_f64().unwrap());
                assert!(
                    (sum - es).abs() < 1e-6 * esq.max(1.0),
                    "{name} sum {sum} vs {es}"
                );
                assert!(
                    (sum_sq - esq).abs() < 1e-9 * esq.max(1.0),
                    "{name} sum_sq {sum_sq} vs {esq}"
                );
                (v, 0)
            }
        };
        for s in e["samples"].as_array().unwrap() {
            let (r, c) = (
                s[0].as_u64().unwrap() as usize,
                s[1].as_u64().unwrap() as usize,
            );
            let expected = s[2].as_f64().unwrap() as f32;
            let got = values[(r - row0) * cols + c];
            assert_eq!(got, expected, "{name}[{r}, {c}]");
        }
    }
}

/// Not a correctness test: dequantizes every tensor of the default model and
/// prints the time (`cargo test --release -p tessera-model --test gguf -- --ignored --nocapture`).
#[test]
#[ignore]
fn dequantize_whole_default_model_timing() {
    let Some(path) = default_model() else { return };
    let f = GgufFile::open(&path).unwrap();
    let start = std::time::Instant::now();
    let mut n = 0usize;
    for t in f.tensors() {
        n += f.dequantize(&t.name).unwrap().len();
    }
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "dequantized {n} elements in {secs:.3} s ({:.0} M elements/s)",
        n as f64 / secs / 1e6
    );
}
