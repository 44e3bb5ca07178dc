//! Reads named weights from a GGUF file or a Hugging Face safetensors folder into
//! libtorch tensors of the engine's dtype and device, one tensor at a time.
//! Weights are addressed by their Hugging Face names; GGUF names are mapped here.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};
use tessera_model::config::{Architecture, ModelConfig};
use tessera_model::gguf::{GgmlType, GgufFile};
use tessera_model::safetensors_folder::{Dtype, SafetensorsFolder};

use crate::error::{EngineError, Result};
use crate::linear::{unpermute_order, Int4Codes};

pub enum WeightSource {
    Gguf(GgufFile),
    Safetensors {
        folder: PathBuf,
        files: SafetensorsFolder,
    },
}

impl WeightSource {
    /// Opens `path`: a `.gguf` file, or a folder with `config.json` and safetensors.
    pub fn open(path: &Path) -> Result<(Self, ModelConfig)> {
        if !path.exists() {
            return Err(EngineError::ModelNotFound(path.to_path_buf()));
        }
        if path.is_file() {
            let file = GgufFile::open(path)?;
            let config = ModelConfig::from_gguf(&file)?;
            return Ok((Self::Gguf(file), config));
        }
        let config_path = path.join("config.json");
        if !config_path.is_file() {
            return Err(EngineError::UnknownModelFormat(path.to_path_buf()));
        }
        let config = ModelConfig::from_hf_json(&config_path)?;
        let files = SafetensorsFolder::open(path)?;
        Ok((
            Self::Safetensors {
                folder: path.to_path_buf(),
                files,
            },
            config,
        ))
    }

    fn gguf_name(hf: &str) -> String {
        let map = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = map.iter().find(|(h, _)| *h == hf) {
            return g.to_string();
        }
        let Some(rest) = hf.strip_prefix("model.layers.") else {
            return hf.to_string();
        };
        let Some((layer, tail)) = rest.split_once('.') else {
            return hf.to_string();
        };
        let parts = [
            ("self_attn.q_proj.", "attn_q."),
            ("self_attn.k_proj.", "attn_k."),
            ("self_attn.v_proj.", "attn_v."),
            ("self_attn.o_proj.", "attn_output."),
            ("mlp.gate_proj.", "ffn_gate."),
            ("mlp.up_proj.", "ffn_up."),
            ("mlp.down_proj.", "ffn_down."),
            ("input_layernorm.", "attn_norm."),
            ("post_attention_layernorm.", "ffn_norm."),
        ];
        for (h, g) in parts {
            if let Some(suffix) = tail.strip_prefix(h) {
                return format!("blk.{layer}.{g}{suffix}");
            }
        }
        hf.to_string()
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            Self::Gguf(f) => f.tensor(&Self::gguf_name(hf_name)).is_some(),
            Self::Safetensors { files, .. } => files.contains(hf_name),
        }
    }

    /// Loads tensor `hf_name`, checks it has `shape`, and converts it to `kind` on `device`.
    /// For GGUF Llama files, q/k projections are un-permuted back to the HF rotary layout.
    pub fn load(
        &self,
        config: &ModelConfig,
        hf_name: &str,
        shape: &[usize],
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        self.load_slice(config, hf_name, shape, Slice::Full, kind, device)
    }

    /// Like [`load`](Self::load), keeping only `slice` of the tensor (this rank's part
    /// under tensor parallelism). A band of rows is read alone from safetensors files
    /// and from GGUF tensors that need no un-permuting; other slices are cut from the
    /// whole tensor, one tensor at a time.
    pub fn load_slice(
        &self,
        config: &ModelConfig,
        hf_name: &str,
        shape: &[usize],
        slice: Slice,
        kind: Kind,
        device: Device,
    ) -> Result<Tensor> {
        slice.check(hf_name, shape)?;
        let (tensor, rest) = match self {
            Self::Gguf(file) => {
                let name = Self::gguf_name(hf_name);
                let info = file
                    .tensor(&name)
                    .ok_or_else(|| EngineError::MissingTensor {
                        name: name.clone(),
                        path: file.path().to_path_buf(),
                    })?;
                check_shape(&name, shape, &info.shape())?;
                if let Some(heads) = self.unpermute_heads(config, hf_name) {
                    let cols = shape.get(1).copied().unwrap_or(1);
                    let data = file.dequantize(&name)?;
                    let data = tessera_model::gguf::try_unpermute_qk(&data, heads, cols)?;
                    let full = Tensor::f_from_slice(&data)?.f_view(dims(shape).as_slice())?;
                    (full, slice)
                } else if let Slice::Rows { start, len } = slice {
                    let rows = dequantize_in_chunks(file, &name, shape, start, len, kind, device)?;
                    (rows, Slice::Full)
                } else {
                    let rows = shape.first().copied().unwrap_or(1);
                    let full = dequantize_in_chunks(file, &name, shape, 0, rows, kind, device)?;
                    (full, slice)
                }
            }
            Self::Safetensors { files, folder } => {
                let bytes = files.tensor(hf_name)?;
                check_shape(hf_name, shape, bytes.shape)?;
                let src_kind = match bytes.dtype {
                    Dtype::F32 => Kind::Float,
                    Dtype::F16 => Kind::Half,
                    Dtype::BF16 => Kind::BFloat16,
                    Dtype::F64 => Kind::Double,
                    other => {
                        return Err(EngineError::UnsupportedDtype {
                            name: format!("{hf_name} (in {})", folder.display()),
                            dtype: format!("{other:?}"),
                        })
                    }
                };
                if let Slice::Rows { start, len } = slice {
                    // Only this band's bytes of the memory map are touched.
                    let row_bytes = bytes.data.len() / shape.first().copied().unwrap_or(1).max(1);
                    let band = &bytes.data[start * row_bytes..(start + len) * row_bytes];
                    let mut band_shape = dims(shape);
                    band_shape[0] = len as i64;
                    (
                        Tensor::f_from_data_size(band, &band_shape, src_kind)?,
                        Slice::Full,
                    )
                } else {
                    let full =
                        Tensor::f_from_data_size(bytes.data, dims(shape).as_slice(), src_kind)?;
                    (full, slice)
                }
            }
        };
        let tensor = rest.apply(&tensor)?;
        Ok(tensor.f_to_kind(kind)?.f_to_device(device)?)
    }
}

/// The part of a weight one rank keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slice {
    Full,
    /// Rows `start..start + len` (dimension 0): column-parallel layers, vocabulary.
    Rows {
        start: usize,
        len: usize,
    },
    /// Columns `start..start + len` (dimension 1): row-parallel layers.
    Cols {
        start: usize,
        len: usize,
    },
}

impl Slice {
    fn check(&self, name: &str, shape: &[usize]) -> Result<()> {
        let (dim, start, len) = match *self {
            Slice::Full => return Ok(()),
            Slice::Rows { start, len } => (0, start, len),
            Slice::Cols { start, len } => (1, start, len),
        };
        match shape.get(dim) {
            Some(&size) if start + len <= size && len > 0 => Ok(()),
            _ => Err(EngineError::Shape {
                name: format!("{name} (slice {self:?})"),
                expected: shape.to_vec(),
                found: shape.to_vec(),
            }),
        }
    }

    fn apply(&self, t: &Tensor) -> Result<Tensor> {
        Ok(match *self {
            Slice::Full => t.shallow_clone(),
            Slice::Rows { start, len } => {
                t.f_narrow(0, start as i64, len as i64)?.f_contiguous()?
            }
            Slice::Cols { start, len } => {
                t.f_narrow(1, start as i64, len as i64)?.f_contiguous()?
            }
        })
    }
}

impl WeightSource {
    /// The int4 codes of `hf_name` when the file stores it as Q4_0 or Q4_1 (lossless),
    /// with llama.cpp's q/k row order undone; `None` for other sources and types.
    pub fn int4_codes(
        &self,
        config: &ModelConfig,
        hf_name: &str,
        shape: &[usize],
    ) -> Result<Option<Int4Codes>> {
        let Self::Gguf(file) = self else {
            return Ok(None);
        };
        let name = Self::gguf_name(hf_name);
        let Some(info) = file.tensor(&name) else {
            return Ok(None);
        };
        let q4_1 = match info.ggml_type {
            GgmlType::Q4_0 => false,
            GgmlType::Q4_1 => true,
            _ => return Ok(None),
        };
        let &[rows, cols] = shape else {
            return Ok(None);
        };
        check_shape(&name, shape, &info.shape())?;
        let Some(codes) = Int4Codes::from_ggml_blocks(q4_1, file.tensor_data(&name)?, rows, cols)
        else {
            return Ok(None);
        };
        let heads = match self.unpermute_heads(config, hf_name) {
            Some(h) => h,
            None => return Ok(Some(codes)),
        };
        Ok(Some(codes.permute_rows(&unpermute_order(rows, heads)?)))
    }

    /// Heads to un-permute `hf_name` over, for llama.cpp's q/k layout.
    fn unpermute_heads(&self, config: &ModelConfig, hf_name: &str) -> Option<usize> {
        if config.architecture == Architecture::Qwen2 {
            None
        } else if hf_name.contains("self_attn.q_proj.") {
            Some(config.num_heads)
        } else if hf_name.contains("self_attn.k_proj.") {
            Some(config.num_kv_heads)
        } else {
            None
        }
    }
}

/// Elements dequantized to f32 at a time, which bounds the memory a large tensor
/// (the embedding) needs on its way to the model dtype.
const DEQUANT_CHUNK: usize = 1 << 22;

/// Dequantizes rows `first..first + count` of `name`, a band of rows at a time, straight
/// into a tensor of `kind`.
fn dequantize_in_chunks(
    file: &GgufFile,
    name: &str,
    shape: &[usize],
    first: usize,
    count: usize,
    kind: Kind,
    device: Device,
) -> Result<Tensor> {
    let cols: usize = shape.iter().skip(1).product::<usize>().max(1);
    let mut out_shape = dims(shape);
    if let Some(d) = out_shape.first_mut() {
        *d = count as i64;
    }
    let out = Tensor::f_empty(out_shape.as_slice(), (kind, device))?;
    let band = (DEQUANT_CHUNK / cols).max(1);
    let mut start = first;
    let end_row = first + count;
    while start < end_row {
        let end = end_row.min(start + band);
        let data = file.dequantize_rows(name, start, end)?;
        let chunk = Tensor::f_from_slice(&data)?
            .f_to_kind(kind)?
            .f_to_device(device)?;
        let mut dst = out.f_narrow(0, (start - first) as i64, (end - start) as i64)?;
        dst.f_copy_(&chunk.f_view_as(&dst)?)?;
        start = end;
    }
    Ok(out)
}

fn dims(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| d as i64).collect()
}

fn check_shape(name: &str, expected: &[usize], found: &[usize]) -> Result<()> {
    // A bias or norm stored as [n] matches an expected [n]; nothing else is reshaped.
    if expected == found {
        Ok(())
    } else {
        Err(EngineError::Shape {
            name: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::WeightSource;

    #[test]
    fn maps_hf_names_to_gguf() {
        assert_eq!(
            WeightSource::gguf_name("model.layers.12.self_attn.q_proj.weight"),
            "blk.12.attn_q.weight"
        );
        assert_eq!(
            WeightSource::gguf_name("model.layers.0.self_attn.k_proj.bias"),
            "blk.0.attn_k.bias"
        );
        assert_eq!(
            WeightSource::gguf_name("model.layers.3.post_attention_layernorm.weight"),
            "blk.3.ffn_norm.weight"
        );
        assert_eq!(WeightSource::gguf_name("lm_head.weight"), "output.weight");
    }
}
