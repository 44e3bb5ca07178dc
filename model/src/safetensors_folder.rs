//! A Hugging Face model folder: `config.json` plus one or many memory-mapped
//! `*.safetensors` files (with `model.safetensors.index.json` when sharded).
//! Tensor bytes are borrowed from the maps; nothing is copied whole into memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
pub use safetensors::tensor::Dtype;
use safetensors::tensor::{SafeTensors, TensorInfo};

#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{path} is not a valid safetensors index: {message}")]
    Index { path: PathBuf, message: String },
    #[error("no *.safetensors file in {0}")]
    NoWeights(PathBuf),
    #[error("tensor {name} not found in {folder}")]
    MissingTensor { folder: PathBuf, name: String },
    #[error("tensor {name} in {path} has data outside the file (bytes {start}..{end} of {len})")]
    Truncated {
        path: PathBuf,
        name: String,
        start: usize,
        end: usize,
        len: usize,
    },
}

/// One tensor's raw little-endian bytes, borrowed from a memory map.
#[derive(Debug, Clone, Copy)]
pub struct TensorBytes<'a> {
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

struct MappedFile {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

pub struct SafetensorsFolder {
    folder: PathBuf,
    files: Vec<MappedFile>,
    /// Tensor name -> index into `files`.
    locations: HashMap<String, usize>,
}

fn map_file(path: &Path) -> Result<MappedFile, SafetensorsError> {
    let io = |source| SafetensorsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the map is read-only; model files are not expected to change while served.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    let (header_len, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| SafetensorsError::Format {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let tensors = metadata
        .tensors()
        .into_iter()
        .map(|(name, info)| (name, info.clone()))
        .collect();
    Ok(MappedFile {
        path: path.to_path_buf(),
        map,
        data_start: 8 + header_len,
        tensors,
    })
}

impl SafetensorsFolder {
    /// Maps every weight file of `folder`: those listed by `model.safetensors.index.json`,
    /// or else every `*.safetensors` file in it.
    pub fn open(folder: &Path) -> Result<Self, SafetensorsError> {
        let index_path = folder.join("model.safetensors.index.json");
        let mut names: Vec<String> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|source| SafetensorsError::Io {
                    path: index_path.clone(),
                    source,
                })?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| SafetensorsError::Index {
                    path: index_path.clone(),
                    message: e.to_string(),
                })?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| SafetensorsError::Index {
                    path: index_path.clone(),
                    message: "missing object \"weight_map\"".into(),
                })?;
            let mut files = Vec::new();
            for v in map.values() {
                let name = v.as_str().ok_or_else(|| SafetensorsError::Index {
                    path: index_path.clone(),
                    message: format!("weight_map value {v} is not a file name"),
                })?;
                files.push(name.to_string());
            }
            files
        } else {
            let entries = std::fs::read_dir(folder).map_err(|source| SafetensorsError::Io {
                path: folder.to_path_buf(),
                source,
            })?;
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors"))
                .collect()
        };
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Err(SafetensorsError::NoWeights(folder.to_path_buf()));
        }
        let mut files = Vec::with_capacity(names.len());
        let mut locations = HashMap::new();
        for (i, name) in names.iter().enumerate() {
            let mapped = map_file(&folder.join(name))?;
            for t in mapped.tensors.keys() {
                locations.insert(t.clone(), i);
            }
            files.push(mapped);
        }
        Ok(Self {
            folder: folder.to_path_buf(),
            files,
            locations,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.locations.contains_key(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.locations.keys().map(String::as_str)
    }

    /// The bytes of tensor `name`, bounds-checked against its file.
    pub fn tensor(&self, name: &str) -> Result<TensorBytes<'_>, SafetensorsError> {
        let missing = || SafetensorsError::MissingTensor {
            folder: self.folder.clone(),
            name: name.to_string(),
        };
        let file = self
            .locations
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(missing)?;
        let info = file.tensors.get(name).ok_or_else(missing)?;
        let (start, end) = info.data_offsets;
        let abs_start = file.data_start.saturating_add(start);
        let abs_end = file.data_start.saturating_add(end);
        if abs_start > abs_end || abs_end > file.map.len() {
            return Err(SafetensorsError::Truncated {
                path: file.path.clone(),
                name: name.to_string(),
                start: abs_start,
                end: abs_end,
                len: file.map.len(),
            });
        }
        Ok(TensorBytes {
            dtype: info.dtype,
            shape: &info.shape,
            data: &file.map[abs_start..abs_end],
        })
    }
}
