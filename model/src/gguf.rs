//! GGUF reader: metadata, tensor index and memory-mapped tensor data, with
//! dequantization of the common ggml block formats to `f32`.
//!
//! Supports GGUF v2 and v3, little-endian. The file is memory-mapped and never
//! read into memory as a whole; tensor data is handed out as slices of the map.
//! Every length and offset read from the file is checked before it is used, so a
//! corrupt or truncated file yields a [`GgufError`], never a panic or a huge
//! allocation.
//!
//! Layout conventions: GGUF stores a tensor's dimensions fastest-first
//! ([`TensorInfo::dims`]); [`TensorInfo::shape`] gives the usual row-major shape
//! (slowest first), which is also the order of the values returned by
//! [`GgufFile::dequantize`].

mod dequant;
mod reader;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use dequant::dequantize_into;

/// The `GGUF` magic at the start of every file.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Any integer type holding a non-negative value (not `Bool`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type whose value fits an `i64` (not `Bool`).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => i64::try_from(v).ok(),
            MetaValue::I8(v) => Some(v.into()),
            MetaValue::I16(v) => Some(v.into()),
            MetaValue::I32(v) => Some(v.into()),
            MetaValue::I64(v) => Some(v),
            _ => None,
        }
    }

    /// Floats and integers (64-bit integers may round).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            MetaValue::U64(v) => Some(v as f64),
            MetaValue::I64(v) => Some(v as f64),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type (`"u32"`, `"string"`, `"array"`, ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            MetaValue::U8(_) => "u8",
            MetaValue::I8(_) => "i8",
            MetaValue::U16(_) => "u16",
            MetaValue::I16(_) => "i16",
            MetaValue::U32(_) => "u32",
            MetaValue::I32(_) => "i32",
            MetaValue::F32(_) => "f32",
            MetaValue::Bool(_) => "bool",
            MetaValue::String(_) => "string",
            MetaValue::Array(_) => "array",
            MetaValue::U64(_) => "u64",
            MetaValue::I64(_) => "i64",
            MetaValue::F64(_) => "f64",
        }
    }

    /// A short description for error messages: the type and a preview of the value.
    fn describe(&self) -> String {
        match self {
            MetaValue::String(s) => {
                let preview: String = s.chars().take(40).collect();
                let more = if preview.len() < s.len() { "..." } else { "" };
                format!("string {preview:?}{more}")
            }
            MetaValue::Array(a) => match a.first() {
                Some(first) => format!("array of {} {}", a.len(), first.type_name()),
                None => "empty array".to_string(),
            },
            MetaValue::U8(v) => format!("u8 {v}"),
            MetaValue::I8(v) => format!("i8 {v}"),
            MetaValue::U16(v) => format!("u16 {v}"),
            MetaValue::I16(v) => format!("i16 {v}"),
            MetaValue::U32(v) => format!("u32 {v}"),
            MetaValue::I32(v) => format!("i32 {v}"),
            MetaValue::F32(v) => format!("f32 {v}"),
            MetaValue::Bool(v) => format!("bool {v}"),
            MetaValue::U64(v) => format!("u64 {v}"),
            MetaValue::I64(v) => format!("i64 {v}"),
            MetaValue::F64(v) => format!("f64 {v}"),
        }
    }
}

/// A ggml tensor type, with its numeric id as stored in GGUF files.
///
/// Ids the reader does not know are kept in [`GgmlType::Unknown`] so that errors
/// can name them; such tensors are listed, but their data cannot be accessed.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
    /// An id this reader does not know (or one ggml has retired).
    Unknown(u32),
}

impl GgmlType {
    /// The type for a ggml numeric id; unknown ids become [`GgmlType::Unknown`].
    pub fn from_id(id: u32) -> GgmlType {
        use GgmlType::*;
        match id {
            0 => F32,
            1 => F16,
            2 => Q4_0,
            3 => Q4_1,
            6 => Q5_0,
            7 => Q5_1,
            8 => Q8_0,
            9 => Q8_1,
            10 => Q2K,
            11 => Q3K,
            12 => Q4K,
            13 => Q5K,
            14 => Q6K,
            15 => Q8K,
            16 => IQ2XXS,
            17 => IQ2XS,
            18 => IQ3XXS,
            19 => IQ1S,
            20 => IQ4NL,
            21 => IQ3S,
            22 => IQ2S,
            23 => IQ4XS,
            24 => I8,
            25 => I16,
            26 => I32,
            27 => I64,
            28 => F64,
            29 => IQ1M,
            30 => BF16,
            34 => TQ1_0,
            35 => TQ2_0,
            39 => MXFP4,
            40 => NVFP4,
            41 => Q1_0,
            other => Unknown(other),
        }
    }

    /// The ggml numeric id.
    pub fn id(self) -> u32 {
        use GgmlType::*;
        match self {
            F32 => 0,
            F16 => 1,
            Q4_0 => 2,
            Q4_1 => 3,
            Q5_0 => 6,
            Q5_1 => 7,
            Q8_0 => 8,
            Q8_1 => 9,
            Q2K => 10,
            Q3K => 11,
            Q4K => 12,
            Q5K => 13,
            Q6K => 14,
            Q8K => 15,
            IQ2XXS => 16,
            IQ2XS => 17,
            IQ3XXS => 18,
            IQ1S => 19,
            IQ4NL => 20,
            IQ3S => 21,
            IQ2S => 22,
            IQ4XS => 23,
            I8 => 24,
            I16 => 25,
            I32 => 26,
            I64 => 27,
            F64 => 28,
            IQ1M => 29,
            BF16 => 30,
            TQ1_0 => 34,
            TQ2_0 => 35,
            MXFP4 => 39,
            NVFP4 => 40,
            Q1_0 => 41,
            Unknown(id) => id,
        }
    }

    /// The name ggml uses (`"Q4_K"`, `"BF16"`, ...).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2XXS => "IQ2_XXS",
            IQ2XS => "IQ2_XS",
            IQ3XXS => "IQ3_XXS",
            IQ1S => "IQ1_S",
            IQ4NL => "IQ4_NL",
            IQ3S => "IQ3_S",
            IQ2S => "IQ2_S",
            IQ4XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
            Unknown(_) => "unknown",
        }
    }

    /// `(elements per block, bytes per block)`; `None` for unknown types.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        use GgmlType::*;
        const QK_K: u64 = 256;
        Some(match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            Q8_1 => (32, 4 + 32),
            Q2K => (QK_K, 2 + 2 + QK_K / 16 + QK_K / 4),
            Q3K => (QK_K, 2 + QK_K / 4 + QK_K / 8 + 12),
            Q4K => (QK_K, 2 + 2 + 12 + QK_K / 2),
            Q5K => (QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2),
            Q6K => (QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16),
            Q8K => (QK_K, 4 + QK_K + 2 * QK_K / 16),
            IQ2XXS => (QK_K, 2 + QK_K / 4),
            IQ2XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3XXS => (QK_K, 2 + QK_K / 4 + QK_K / 8),
            IQ1S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4NL => (32, 2 + 16),
            IQ3S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4XS => (QK_K, 2 + 2 + QK_K / 2 + QK_K / 64),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
            Unknown(_) => return None,
        })
    }

    /// Elements per block (1 for plain types); `None` for unknown types.
    pub fn block_size(self) -> Option<u64> {
        self.block_layout().map(|(elems, _)| elems)
    }

    /// Bytes per block; `None` for unknown types.
    pub fn type_size(self) -> Option<u64> {
        self.block_layout().map(|(_, bytes)| bytes)
    }

    /// Bytes needed for `n` elements; `None` for unknown types, when `n` is not
    /// a whole number of blocks, or on overflow.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let (elems, bytes) = self.block_layout()?;
        if !n.is_multiple_of(elems) {
            return None;
        }
        (n / elems).checked_mul(bytes)
    }

    /// Whether [`dequantize_into`] supports this type.
    pub fn can_dequantize(self) -> bool {
        dequant::supported(self)
    }

    /// Whether this is a block-quantized type (not a plain float or integer type).
    pub fn is_quantized(self) -> bool {
        !matches!(
            self,
            GgmlType::F32
                | GgmlType::F16
                | GgmlType::BF16
                | GgmlType::F64
                | GgmlType::I8
                | GgmlType::I16
                | GgmlType::I32
                | GgmlType::I64
                | GgmlType::Unknown(_)
        )
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgmlType::Unknown(id) => write!(f, "unknown ggml type {id}"),
            other => f.write_str(other.name()),
        }
    }
}

/// One entry of the tensor index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// As stored in the file: fastest-varying dimension first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data, relative to the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// Number of elements (1 for a tensor without dimensions). The reader checks
    /// at open time that this product does not overflow.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }

    /// Row-major shape, slowest dimension first (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d).unwrap_or(usize::MAX))
            .collect()
    }

    /// Size of the data in bytes; `None` for unknown types or an element count
    /// that is not a whole number of blocks.
    pub fn byte_len(&self) -> Option<u64> {
        self.ggml_type.bytes_for(self.n_elements())
    }

    /// Number of rows along the slowest dimension (1 for a tensor without dimensions).
    pub fn n_rows(&self) -> u64 {
        self.dims.last().copied().unwrap_or(1)
    }
}

/// Errors of the GGUF reader.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a GGUF file: it starts with {found:02x?}, expected the magic \"GGUF\"", path.display())]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{}: big-endian GGUF files are not supported", path.display())]
    BigEndian { path: PathBuf },
    #[error("{}: unsupported GGUF version {version} (supported: 2 and 3)", path.display())]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{} is truncated: reading {what} needs {needed} bytes at offset {offset}, but the file has {file_len} bytes", path.display())]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        needed: u64,
        file_len: u64,
    },
    #[error("{} is truncated: the data of tensor '{tensor}' spans bytes {start}..{end}, but the file has {file_len} bytes", path.display())]
    TensorDataOutOfBounds {
        path: PathBuf,
        tensor: String,
        start: u64,
        end: u64,
        file_len: u64,
    },
    #[error("{}: corrupt GGUF file: {what}", path.display())]
    Corrupt { path: PathBuf, what: String },
    #[error("tensor '{tensor}' has unknown ggml type id {type_id}")]
    UnknownType { tensor: String, type_id: u32 },
    #[error("tensor '{tensor}' has ggml type {} (id {type_id}), which cannot be dequantized", ggml_type.name())]
    UnsupportedType {
        tensor: String,
        ggml_type: GgmlType,
        type_id: u32,
    },
    #[error("metadata key '{key}' is missing (expected {expected})")]
    MissingKey { key: String, expected: &'static str },
    #[error("metadata key '{key}' has the wrong type: expected {expected}, found {found}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: String,
    },
    #[error("no tensor named '{0}'")]
    TensorNotFound(String),
    #[error("tensor '{tensor}': row range {start}..{end} is outside its {rows} rows")]
    RowRangeOutOfBounds {
        tensor: String,
        start: usize,
        end: usize,
        rows: u64,
    },
    #[error("tensor '{tensor}': row range {start}..{end} does not start and end on a {ggml_type} block boundary ({block_size} elements; a row has {row_elements})")]
    RowRangeUnaligned {
        tensor: String,
        start: usize,
        end: usize,
        ggml_type: GgmlType,
        block_size: u64,
        row_elements: u64,
    },
    #[error("{ggml_type}: {n} elements need {expected} bytes, got {got}")]
    SizeMismatch {
        ggml_type: GgmlType,
        n: usize,
        expected: u64,
        got: usize,
    },
    #[error("bad shape: {0}")]
    BadShape(String),
}

/// An open, memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    alignment: u64,
    data_offset: u64,
    metadata: BTreeMap<String, MetaValue>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("file_len", &self.mmap.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("n_metadata", &self.metadata.len())
            .field("n_tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and memory-map a GGUF file, parsing its header, metadata and tensor
    /// index, and checking that every tensor's data lies inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        reader::open(path.as_ref())
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetaValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        conv: impl FnOnce(&'a MetaValue) -> Option<T>,
    ) -> Result<T, GgufError> {
        let value = self
            .metadata
            .get(key)
            .ok_or_else(|| GgufError::MissingKey {
                key: key.to_string(),
                expected,
            })?;
        conv(value).ok_or_else(|| GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: value.describe(),
        })
    }

    /// A non-negative integer of any width.
    pub fn get_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.typed(key, "a non-negative integer", MetaValue::as_u64)
    }

    /// An integer of any width that fits an `i64`.
    pub fn get_i64(&self, key: &str) -> Result<i64, GgufError> {
        self.typed(key, "an integer", MetaValue::as_i64)
    }

    /// A float or an integer.
    pub fn get_f64(&self, key: &str) -> Result<f64, GgufError> {
        self.typed(key, "a number", MetaValue::as_f64)
    }

    pub fn get_str(&self, key: &str) -> Result<&str, GgufError> {
        self.typed(key, "a string", MetaValue::as_str)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, GgufError> {
        self.typed(key, "a bool", MetaValue::as_bool)
    }

    pub fn get_array(&self, key: &str) -> Result<&[MetaValue], GgufError> {
        self.typed(key, "an array", MetaValue::as_array)
    }

    /// The tensor index, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn tensor_or_err(&self, name: &str) -> Result<&TensorInfo, GgufError> {
        self.tensor(name)
            .ok_or_else(|| GgufError::TensorNotFound(name.to_string()))
    }

    /// Absolute `[start, end)` byte range of a tensor's data, bounds-checked.
    fn data_range(&self, info: &TensorInfo) -> Result<(usize, usize), GgufError> {
        let len = match info.ggml_type {
            GgmlType::Unknown(id) => {
                return Err(GgufError::UnknownType {
                    tensor: info.name.clone(),
                    type_id: id,
                })
            }
            ty => ty.bytes_for(info.n_elements()),
        };
        let file_len = self.file_len();
        let start = self.data_offset.checked_add(info.offset);
        let end = len.and_then(|len| start?.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                // end <= file_len, which is a usize.
                Ok((start as usize, end as usize))
            }
            _ => Err(GgufError::TensorDataOutOfBounds {
                path: self.path.clone(),
                tensor: info.name.clone(),
                start: start.unwrap_or(u64::MAX),
                end: end.unwrap_or(u64::MAX),
                file_len,
            }),
        }
    }

    /// The raw bytes of a tensor, straight from the memory map.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8], GgufError> {
        let info = self.tensor_or_err(name)?;
        let (start, end) = self.data_range(info)?;
        self.mmap
            .get(start..end)
            .ok_or_else(|| GgufError::TensorDataOutOfBounds {
                path: self.path.clone(),
                tensor: info.name.clone(),
                start: start as u64,
                end: end as u64,
                file_len: self.file_len(),
            })
    }

    fn check_dequantizable(info: &TensorInfo) -> Result<(), GgufError> {
        match info.ggml_type {
            GgmlType::Unknown(id) => Err(GgufError::UnknownType {
                tensor: info.name.clone(),
                type_id: id,
            }),
            ty if !dequant::supported(ty) => Err(GgufError::UnsupportedType {
                tensor: info.name.clone(),
                ggml_type: ty,
                type_id: ty.id(),
            }),
            _ => Ok(()),
        }
    }

    /// Dequantize the whole tensor into f32, row-major with the slowest dimension first.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor_or_err(name)?;
        Self::check_dequantizable(info)?;
        let bytes = self.tensor_data(name)?;
        // The element count is bounded by the (bounds-checked) data size.
        let n = usize::try_from(info.n_elements())
            .map_err(|_| GgufError::BadShape(format!("tensor '{name}' is too large")))?;
        let mut out = vec![0f32; n];
        dequant::dequantize_named(info.ggml_type, bytes, &mut out, name)?;
        Ok(out)
    }

    /// Dequantize only rows `[start, end)` along the slowest dimension.
    ///
    /// For block-quantized types the range must begin and end on block
    /// boundaries, which holds for any range when a row (the product of the
    /// other dimensions) is a multiple of the block size, as it is for 2-D weights.
    pub fn dequantize_rows(
        &self,
        name: &str,
        start: usize,
        end: usize,
    ) -> Result<Vec<f32>, GgufError> {
        let info = self.tensor_or_err(name)?;
        let rows = info.n_rows();
        if start > end || end as u64 > rows {
            return Err(GgufError::RowRangeOutOfBounds {
                tensor: name.to_string(),
                start,
                end,
                rows,
            });
        }
        Self::check_dequantizable(info)?;
        let bytes = self.tensor_data(name)?;
        if start == end {
            return Ok(Vec::new());
        }
        // rows > 0 here because end > start >= 0 and end <= rows.
        let row_elements = info.n_elements() / rows;
        let (block_size, type_size) = info.ggml_type.block_layout().unwrap_or((1, 1));
        let elem_start = start as u64 * row_elements;
        let elem_end = end as u64 * row_elements;
        if !elem_start.is_multiple_of(block_size) || !elem_end.is_multiple_of(block_size) {
            return Err(GgufError::RowRangeUnaligned {
                tensor: name.to_string(),
                start,
                end,
                ggml_type: info.ggml_type,
                block_size,
                row_elements,
            });
        }
        let byte_start = (elem_start / block_size * type_size) as usize;
        let byte_end = (elem_end / block_size * type_size) as usize;
        let slice = bytes.get(byte_start..byte_end).ok_or_else(|| {
            GgufError::BadShape(format!("tensor '{name}': row slice out of range"))
        })?;
        let mut out = vec![0f32; (elem_end - elem_start) as usize];
        dequant::dequantize_named(info.ggml_type, slice, &mut out, name)?;
        Ok(out)
    }
}

/// Undo llama.cpp's Q/K row permutation so that HF rotate-half RoPE applies.
///
/// `w` is row-major `[n_heads * head_dim, cols]` (or a bias, `cols == 1`). Within
/// each head, llama.cpp's converter interleaved the two rotary halves; this maps
/// `[heads, head_dim/2, 2, cols]` to `[heads, 2, head_dim/2, cols]`.
///
/// # Panics
/// If `w.len()` is not `n_heads * head_dim * cols` with an even `head_dim`
/// (including `n_heads == 0` or `cols == 0`). Use [`try_unpermute_qk`] when the
/// arguments come from an untrusted file.
pub fn unpermute_qk(w: &[f32], n_heads: usize, cols: usize) -> Vec<f32> {
    match try_unpermute_qk(w, n_heads, cols) {
        Ok(v) => v,
        Err(e) => panic!("unpermute_qk: {e}"),
    }
}

/// [`unpermute_qk`] that reports inconsistent arguments as an error.
pub fn try_unpermute_qk(w: &[f32], n_heads: usize, cols: usize) -> Result<Vec<f32>, GgufError> {
    let per_head = n_heads.checked_mul(cols).filter(|&p| p > 0);
    let head_dim = match per_head {
        Some(p) if w.len().is_multiple_of(p) && (w.len() / p).is_multiple_of(2) => w.len() / p,
        _ => {
            return Err(GgufError::BadShape(format!(
                "cannot unpermute {} values as {n_heads} heads x {cols} columns with an even head dimension",
                w.len()
            )))
        }
    };
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(w.len());
    for h in 0..n_heads {
        let head = &w[h * head_dim * cols..(h + 1) * head_dim * cols];
        for parity in 0..2 {
            for i in 0..half {
                let src = (2 * i + parity) * cols;
                out.extend_from_slice(&head[src..src + cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
