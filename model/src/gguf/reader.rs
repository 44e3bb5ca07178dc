//! Parsing of the GGUF header, metadata and tensor index from a memory map.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use super::{
    GgmlType, GgufError, GgufFile, MetaValue, TensorInfo, ALIGNMENT_KEY, DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
};

/// Deepest nesting of metadata arrays accepted (real files use 1 level).
const MAX_ARRAY_DEPTH: u32 = 8;
/// Most tensor dimensions accepted (ggml itself has 4).
const MAX_DIMS: u32 = 8;
/// Largest `general.alignment` accepted.
const MAX_ALIGNMENT: u64 = 1 << 30;

// Metadata value type ids.
const T_U8: u32 = 0;
const T_I8: u32 = 1;
const T_U16: u32 = 2;
const T_I16: u32 = 3;
const T_U32: u32 = 4;
const T_I32: u32 = 5;
const T_F32: u32 = 6;
const T_BOOL: u32 = 7;
const T_STRING: u32 = 8;
const T_ARRAY: u32 = 9;
const T_U64: u32 = 10;
const T_I64: u32 = 11;
const T_F64: u32 = 12;

/// The fewest bytes one value of a metadata type can occupy; `None` for unknown types.
fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,    // the length
        T_ARRAY => 4 + 8, // element type and count
        _ => return None,
    })
}

fn value_type_name(ty: u32) -> Cow<'static, str> {
    Cow::Borrowed(match ty {
        T_U8 => "u8",
        T_I8 => "i8",
        T_U16 => "u16",
        T_I16 => "i16",
        T_U32 => "u32",
        T_I32 => "i32",
        T_F32 => "f32",
        T_BOOL => "bool",
        T_STRING => "string",
        T_ARRAY => "array",
        T_U64 => "u64",
        T_I64 => "i64",
        T_F64 => "f64",
        other => return Cow::Owned(format!("unknown type {other}")),
    })
}

/// A bounds-checked little-endian reader over the mapped file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
    /// Metadata strings that were not valid UTF-8 (kept lossily).
    lossy_strings: u64,
}

type What<'w> = &'w dyn Fn() -> String;

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn truncated(&self, what: String, needed: u64) -> GgufError {
        GgufError::Truncated {
            path: self.path.to_path_buf(),
            what,
            offset: self.pos as u64,
            needed,
            file_len: self.buf.len() as u64,
        }
    }

    fn corrupt(&self, what: String) -> GgufError {
        GgufError::Corrupt {
            path: self.path.to_path_buf(),
            what,
        }
    }

    fn take(&mut self, n: u64, what: What<'_>) -> Result<&'a [u8], GgufError> {
        if n > self.remaining() {
            return Err(self.truncated(what(), n));
        }
        // n <= remaining, so it fits a usize and the range is in bounds.
        let end = self.pos + n as usize;
        let bytes = self
            .buf
            .get(self.pos..end)
            .ok_or_else(|| self.truncated(what(), n))?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let bytes = self.take(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A GGUF string: u64 length, then the bytes.
    fn string_bytes(&mut self, what: What<'_>) -> Result<&'a [u8], GgufError> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    /// A string that must be valid UTF-8 (keys, tensor names).
    fn strict_string(&mut self, what: What<'_>) -> Result<String, GgufError> {
        let bytes = self.string_bytes(what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_string()),
            Err(e) => Err(self.corrupt(format!("{} is not valid UTF-8 ({e})", what()))),
        }
    }

    fn value(&mut self, ty: u32, depth: u32, what: What<'_>) -> Result<MetaValue, GgufError> {
        Ok(match ty {
            T_U8 => MetaValue::U8(self.array::<1>(what)?[0]),
            T_I8 => MetaValue::I8(i8::from_le_bytes(self.array(what)?)),
            T_U16 => MetaValue::U16(u16::from_le_bytes(self.array(what)?)),
            T_I16 => MetaValue::I16(i16::from_le_bytes(self.array(what)?)),
            T_U32 => MetaValue::U32(u32::from_le_bytes(self.array(what)?)),
            T_I32 => MetaValue::I32(i32::from_le_bytes(self.array(what)?)),
            T_F32 => MetaValue::F32(f32::from_le_bytes(self.array(what)?)),
            T_BOOL => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            T_U64 => MetaValue::U64(u64::from_le_bytes(self.array(what)?)),
            T_I64 => MetaValue::I64(i64::from_le_bytes(self.array(what)?)),
            T_F64 => MetaValue::F64(f64::from_le_bytes(self.array(what)?)),
            T_STRING => {
                let bytes = self.string_bytes(what)?;
                match String::from_utf8_lossy(bytes) {
                    Cow::Borrowed(s) => MetaValue::String(s.to_string()),
                    Cow::Owned(s) => {
                        self.lossy_strings += 1;
                        MetaValue::String(s)
                    }
                }
            }
            T_ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.corrupt(format!(
                        "{} nests arrays more than {MAX_ARRAY_DEPTH} deep",
                        what()
                    )));
                }
                let elem_ty = self.u32(what)?;
                let count = self.u64(what)?;
                let Some(min_size) = min_value_size(elem_ty) else {
                    return Err(self.corrupt(format!(
                        "{} is an array of unknown value type {elem_ty}",
                        what()
                    )));
                };
                // Guard the allocation: every element needs at least `min_size` bytes.
                if count > self.remaining() / min_size {
                    let needed = count.saturating_mul(min_size);
                    return Err(self.truncated(
                        format!(
                            "{} (an array of {count} {} values)",
                            what(),
                            value_type_name(elem_ty)
                        ),
                        needed,
                    ));
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, depth + 1, what)?);
                }
                MetaValue::Array(items)
            }
            other => {
                return Err(self.corrupt(format!(
                    "{} has unknown metadata value type {other}",
                    what()
                )))
            }
        })
    }
}

pub(super) fn open(path: &Path) -> Result<GgufFile, GgufError> {
    let io_err = |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    if meta.len() < GGUF_MAGIC.len() as u64 {
        // Too short to map usefully; still say "not GGUF" when the bytes differ.
        let head = std::fs::read(path).map_err(io_err)?;
        if !GGUF_MAGIC.starts_with(&head) {
            return Err(GgufError::BadMagic {
                path: path.to_path_buf(),
                found: head,
            });
        }
        return Err(GgufError::Truncated {
            path: path.to_path_buf(),
            what: "the magic".to_string(),
            offset: 0,
            needed: GGUF_MAGIC.len() as u64,
            file_len: meta.len(),
        });
    }
    // SAFETY: the map is read-only. As with any file mapping, another process
    // truncating or rewriting the file while it is mapped is not supported.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
    parse(path, mmap)
}

fn parse(path: &Path, mmap: Mmap) -> Result<GgufFile, GgufError> {
    let mut c = Cursor {
        buf: &mmap[..],
        pos: 0,
        path,
        lossy_strings: 0,
    };

    let magic_len = GGUF_MAGIC.len().min(c.buf.len());
    let head = c.buf.get(..magic_len).unwrap_or_default();
    if head != &GGUF_MAGIC[..magic_len] {
        return Err(GgufError::BadMagic {
            path: path.to_path_buf(),
            found: head.to_vec(),
        });
    }
    c.array::<4>(&|| "the magic".to_string())?;

    let version = c.u32(&|| "the version".to_string())?;
    match version {
        2 | 3 => {}
        v if v & 0xffff == 0 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(GgufError::BigEndian {
                path: path.to_path_buf(),
            })
        }
        v => {
            return Err(GgufError::UnsupportedVersion {
                path: path.to_path_buf(),
                version: v,
            })
        }
    }

    let n_tensors = c.u64(&|| "the tensor count".to_string())?;
    let n_kv = c.u64(&|| "the metadata count".to_string())?;

    // Metadata. Each entry needs a key length (8), a type (4) and a value (>= 1).
    const MIN_KV: u64 = 8 + 4 + 1;
    if n_kv > c.remaining() / MIN_KV {
        return Err(c.truncated(
            format!("{n_kv} metadata entries"),
            n_kv.saturating_mul(MIN_KV),
        ));
    }
    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = c.strict_string(&|| format!("the key of metadata entry #{i}"))?;
        let ty = c.u32(&|| format!("the value type of metadata key '{key}'"))?;
        let before = c.lossy_strings;
        let value = c.value(ty, 0, &|| format!("the value of metadata key '{key}'"))?;
        if c.lossy_strings != before {
            tracing::warn!(
                path = %path.display(),
                key = %key,
                count = c.lossy_strings - before,
                "GGUF metadata strings are not valid UTF-8; invalid bytes were replaced"
            );
        }
        if metadata.contains_key(&key) {
            return Err(c.corrupt(format!("metadata key '{key}' appears twice")));
        }
        metadata.insert(key, value);
    }

    // Tensor index. Each entry needs a name length (8), n_dims (4), a type (4)
    // and an offset (8).
    const MIN_TENSOR: u64 = 8 + 4 + 4 + 8;
    if n_tensors > c.remaining() / MIN_TENSOR {
        return Err(c.truncated(
            format!("{n_tensors} tensor index entries"),
            n_tensors.saturating_mul(MIN_TENSOR),
        ));
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut by_name = HashMap::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = c.strict_string(&|| format!("the name of tensor #{i}"))?;
        let n_dims = c.u32(&|| format!("the number of dimensions of tensor '{name}'"))?;
        if n_dims > MAX_DIMS {
            return Err(c.corrupt(format!(
                "tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS} are supported)"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for d in 0..n_dims {
            dims.push(c.u64(&|| format!("dimension {d} of tensor '{name}'"))?);
        }
        let ggml_type = GgmlType::from_id(c.u32(&|| format!("the type of tensor '{name}'"))?);
        let offset = c.u64(&|| format!("the data offset of tensor '{name}'"))?;
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= i64::MAX as u64);
        if n_elements.is_none() {
            return Err(c.corrupt(format!(
                "tensor '{name}' has dimensions {dims:?}, whose product overflows"
            )));
        }
        if by_name.insert(name.clone(), tensors.len()).is_some() {
            return Err(c.corrupt(format!("tensor name '{name}' appears twice")));
        }
        tensors.push(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() && a <= MAX_ALIGNMENT => a,
            _ => {
                return Err(c.corrupt(format!(
                    "{ALIGNMENT_KEY} is {}, not a power of two up to {MAX_ALIGNMENT}",
                    v.describe()
                )))
            }
        },
    };
    let infos_end = c.pos as u64;
    // infos_end <= file length and alignment <= 2^30: no overflow.
    let data_offset = infos_end.div_ceil(alignment) * alignment;
    let file_len = c.buf.len() as u64;

    for t in &tensors {
        if matches!(t.ggml_type, GgmlType::Unknown(_)) {
            // Listed, but its size is unknown; accessing its data is an error.
            tracing::debug!(tensor = %t.name, "GGUF tensor has an unknown ggml type");
            continue;
        }
        let (block_size, _) = t.ggml_type.block_layout().unwrap_or((1, 1));
        let ne0 = t.dims.first().copied().unwrap_or(1);
        if !ne0.is_multiple_of(block_size) {
            return Err(c.corrupt(format!(
                "tensor '{}' has a first dimension of {ne0}, not a multiple of the {} block size {block_size}",
                t.name, t.ggml_type
            )));
        }
        if !t.offset.is_multiple_of(alignment) {
            return Err(c.corrupt(format!(
                "tensor '{}' has data offset {}, not a multiple of the alignment {alignment}",
                t.name, t.offset
            )));
        }
        let start = data_offset.checked_add(t.offset);
        let end = t
            .byte_len()
            .and_then(|len| start.and_then(|s| s.checked_add(len)));
        match end {
            Some(end) if end <= file_len => {}
            _ => {
                return Err(GgufError::TensorDataOutOfBounds {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                })
            }
        }
    }

    Ok(GgufFile {
        path: path.to_path_buf(),
        mmap,
        version,
        alignment,
        data_offset,
        metadata,
        tensors,
        by_name,
    })
}
