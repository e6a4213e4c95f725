//! GGUF header reader: magic, version, metadata and tensor infos, never the tensor data.
//!
//! Format (llama.cpp `ggml/src/gguf.cpp`, `docs/gguf.md` in ggml): all little-endian.
//!
//! ```text
//! "GGUF" u32:version u64:n_tensors u64:n_kv
//! n_kv × { string:key u32:value_type value }
//! n_tensors × { string:name u32:n_dims u64[n_dims]:ne u32:ggml_type u64:offset }
//! padding to `general.alignment` (default 32), then the tensor data
//! string = u64:len bytes (no terminator); array = u32:elem_type u64:len elems
//! ```
//!
//! Version 1 used 32-bit counts and lengths and is rejected. Every length read from the file is
//! checked against [`GgufLimits`] before anything is allocated or skipped, so a truncated,
//! corrupt or hostile file costs at most the bytes it really has (bounded by the limits) and
//! ends in a [`GgufError`], never a panic or a huge allocation.

use crate::read::ProfileError;
use crate::roots::{ModelAccess, OpenError};
use berth_options::{
    Attention, Experts, MAX_LAYERS, ModelProfile, ProfileFormat, WeightBytes, layer_count,
    pattern_layers,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS`.
pub const GGML_MAX_DIMS: u32 = 4;

/// Bounds on what a header may contain. The defaults accept every real model we know of (the
/// largest vocabularies have ~260k tokens; chat templates are tens of KiB) with wide margins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GgufLimits {
    /// Longest string (key, value, tensor name, array element), bytes.
    pub max_string_len: u64,
    /// Array elements over the whole header, kept or skipped, nested ones included.
    pub max_array_elements: u64,
    /// Arrays longer than this are checked and skipped, recorded as [`MetaValue::Skipped`]
    /// (type and length only). Token lists are the usual case; nothing in a profile needs them.
    pub keep_array_len: u64,
    /// Arrays inside arrays, this deep at most.
    pub max_array_depth: u32,
    pub max_kv_count: u64,
    pub max_tensor_count: u64,
    /// Bytes of header (everything before the tensor data) read or skipped, at most.
    pub max_header_bytes: u64,
    /// Memory the parsed header may take, at most (about: each kept value, string and
    /// tensor info with its bookkeeping). A header of many tiny kept values costs many
    /// times its size in memory; this bounds that, whatever the other limits allow.
    pub max_kept_bytes: u64,
}

impl Default for GgufLimits {
    fn default() -> Self {
        Self {
            max_string_len: 1 << 20,
            max_array_elements: 16 << 20,
            keep_array_len: 4096,
            max_array_depth: 4,
            max_kv_count: 1 << 16,
            max_tensor_count: 1 << 20,
            max_header_bytes: 512 << 20,
            max_kept_bytes: 128 << 20,
        }
    }
}

impl GgufLimits {
    /// The defaults, but every array is kept in full (within `max_array_elements`).
    pub fn keep_all_arrays() -> Self {
        Self {
            keep_array_len: u64::MAX,
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("reading the GGUF file: {0}")]
    Io(#[from] io::Error),
    #[error("not a GGUF file (starts with {0:02x?}, expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("GGUF version {0} is not supported (versions 2 and 3 are)")]
    UnsupportedVersion(u32),
    #[error("big-endian GGUF files are not supported")]
    BigEndian,
    #[error("file ends early, at byte {offset}, while reading {what}")]
    Truncated { what: &'static str, offset: u64 },
    #[error("{what} too large: {value} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        value: u64,
        limit: u64,
    },
    #[error("metadata key {key:?}: unknown value type {value_type}")]
    BadValueType { key: String, value_type: u32 },
    #[error("tensor {name:?}: unknown or removed ggml type {type_id}")]
    BadTensorType { name: String, type_id: u32 },
    #[error("tensor {name:?}: {reason}")]
    BadTensor { name: String, reason: String },
    #[error("metadata key {0:?} appears twice")]
    DuplicateKey(String),
    #[error("tensor {0:?} appears twice")]
    DuplicateTensor(String),
    #[error("metadata key {key:?} is {found}, expected {expected}")]
    WrongType {
        key: String,
        found: &'static str,
        expected: &'static str,
    },
    #[error("general.alignment {0} is not a power of two")]
    BadAlignment(u64),
    #[error("tensor data needs {need} bytes but the file has {have}")]
    DataTruncated { need: u64, have: u64 },
    /// The file could not be opened where model files may be read.
    #[error(transparent)]
    Refused(#[from] OpenError),
}

/// Metadata value types (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl ValueType {
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// Encoded size of one value, for the fixed-size types.
    pub fn fixed_size(self) -> Option<u64> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::String | Self::Array => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq, Serialize)]
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
    U64(u64),
    I64(i64),
    F64(f64),
    Array {
        elem: ValueType,
        items: Vec<MetaValue>,
    },
    /// An array longer than [`GgufLimits::keep_array_len`]: its framing was read and checked,
    /// its elements were not kept.
    Skipped {
        elem: ValueType,
        len: u64,
    },
}

impl MetaValue {
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::F32(_) => ValueType::F32,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F64(_) => ValueType::F64,
            Self::Array { .. } | Self::Skipped { .. } => ValueType::Array,
        }
    }

    /// Any integer that is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// Length of an array, kept or skipped.
    pub fn array_len(&self) -> Option<u64> {
        match self {
            Self::Array { items, .. } => Some(items.len() as u64),
            Self::Skipped { len, .. } => Some(*len),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            Self::Array { items, .. } => Some(items),
            _ => None,
        }
    }
}

/// Tensor element types (`enum ggml_type` in `ggml/include/ggml.h`). Ids 4, 5 (Q4_2, Q4_3),
/// 31–33 (Q4_0_4_4 …) and 36–38 (IQ4_NL_4_4 …) were removed from ggml and are rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2_K,
    Q3_K,
    Q4_K,
    Q5_K,
    Q6_K,
    Q8_K,
    IQ2_XXS,
    IQ2_XS,
    IQ3_XXS,
    IQ1_S,
    IQ4_NL,
    IQ3_S,
    IQ2_S,
    IQ4_XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1_M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
    NVFP4,
    Q1_0,
}

/// `QK_K`, the super-block of the K-quants and most IQ types.
const QK_K: u64 = 256;

/// id, type, name, elements per block (`blck_size`), bytes per block (`type_size`): the
/// `type_traits` table in `ggml/src/ggml.c`, block layouts in `ggml/src/ggml-common.h`.
const GGML_TYPES: &[(u32, GgmlType, &str, u64, u64)] = &[
    (0, GgmlType::F32, "F32", 1, 4),
    (1, GgmlType::F16, "F16", 1, 2),
    (2, GgmlType::Q4_0, "Q4_0", 32, 2 + 16),
    (3, GgmlType::Q4_1, "Q4_1", 32, 2 + 2 + 16),
    (6, GgmlType::Q5_0, "Q5_0", 32, 2 + 4 + 16),
    (7, GgmlType::Q5_1, "Q5_1", 32, 2 + 2 + 4 + 16),
    (8, GgmlType::Q8_0, "Q8_0", 32, 2 + 32),
    (9, GgmlType::Q8_1, "Q8_1", 32, 2 + 2 + 32),
    (
        10,
        GgmlType::Q2_K,
        "Q2_K",
        QK_K,
        QK_K / 16 + QK_K / 4 + 2 + 2,
    ),
    (
        11,
        GgmlType::Q3_K,
        "Q3_K",
        QK_K,
        QK_K / 8 + QK_K / 4 + 12 + 2,
    ),
    (12, GgmlType::Q4_K, "Q4_K", QK_K, 2 + 2 + 12 + QK_K / 2),
    (
        13,
        GgmlType::Q5_K,
        "Q5_K",
        QK_K,
        2 + 2 + 12 + QK_K / 8 + QK_K / 2,
    ),
    (
        14,
        GgmlType::Q6_K,
        "Q6_K",
        QK_K,
        QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
    ),
    (15, GgmlType::Q8_K, "Q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2),
    (16, GgmlType::IQ2_XXS, "IQ2_XXS", QK_K, 2 + QK_K / 8 * 2),
    (
        17,
        GgmlType::IQ2_XS,
        "IQ2_XS",
        QK_K,
        2 + QK_K / 8 * 2 + QK_K / 32,
    ),
    (18, GgmlType::IQ3_XXS, "IQ3_XXS", QK_K, 2 + 3 * (QK_K / 8)),
    (19, GgmlType::IQ1_S, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16),
    (20, GgmlType::IQ4_NL, "IQ4_NL", 32, 2 + 16),
    (
        21,
        GgmlType::IQ3_S,
        "IQ3_S",
        QK_K,
        2 + 13 * (QK_K / 32) + QK_K / 64,
    ),
    (22, GgmlType::IQ2_S, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16),
    (
        23,
        GgmlType::IQ4_XS,
        "IQ4_XS",
        QK_K,
        2 + 2 + QK_K / 64 + QK_K / 2,
    ),
    (24, GgmlType::I8, "I8", 1, 1),
    (25, GgmlType::I16, "I16", 1, 2),
    (26, GgmlType::I32, "I32", 1, 4),
    (27, GgmlType::I64, "I64", 1, 8),
    (28, GgmlType::F64, "F64", 1, 8),
    (
        29,
        GgmlType::IQ1_M,
        "IQ1_M",
        QK_K,
        QK_K / 8 + QK_K / 16 + QK_K / 32,
    ),
    (30, GgmlType::BF16, "BF16", 1, 2),
    (
        34,
        GgmlType::TQ1_0,
        "TQ1_0",
        QK_K,
        (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2,
    ),
    (35, GgmlType::TQ2_0, "TQ2_0", QK_K, QK_K / 4 + 2),
    (39, GgmlType::MXFP4, "MXFP4", 32, 1 + 16),
    (40, GgmlType::NVFP4, "NVFP4", 64, 4 + 32),
    (41, GgmlType::Q1_0, "Q1_0", 128, 2 + 16),
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<Self> {
        GGML_TYPES.iter().find(|r| r.0 == id).map(|r| r.1)
    }

    /// Parses a type name, case-insensitively ("q4_k", "F16", "bf16").
    pub fn from_name(name: &str) -> Option<Self> {
        GGML_TYPES
            .iter()
            .find(|r| r.2.eq_ignore_ascii_case(name))
            .map(|r| r.1)
    }

    fn row(self) -> (u32, GgmlType, &'static str, u64, u64) {
        // Every variant has a row (checked by a test); F32's is the harmless fallback.
        GGML_TYPES
            .iter()
            .copied()
            .find(|r| r.1 == self)
            .unwrap_or(GGML_TYPES[0])
    }

    pub fn id(self) -> u32 {
        self.row().0
    }

    pub fn name(self) -> &'static str {
        self.row().2
    }

    /// Elements per block.
    pub fn block_size(self) -> u64 {
        self.row().3
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        self.row().4
    }

    /// Bytes of `n` elements (`ggml_row_size`); `None` when `n` is not whole blocks or overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let bs = self.block_size();
        if !n.is_multiple_of(bs) {
            return None;
        }
        (n / bs).checked_mul(self.type_size())
    }

    /// Bits per element, for display.
    pub fn bits_per_weight(self) -> f64 {
        self.type_size() as f64 * 8.0 / self.block_size() as f64
    }

    pub fn all() -> impl Iterator<Item = GgmlType> {
        GGML_TYPES.iter().map(|r| r.1)
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    /// `ne`: dims[0] is the innermost (row) dimension.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    pub fn elements(&self) -> u64 {
        // Checked when read: the product fits. Saturates for hand-built infos.
        self.dims.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Bytes of the tensor data (`ggml_nbytes`): rows of `dims[0]` elements in blocks.
    pub fn bytes(&self) -> u64 {
        let row = self.dims.first().copied().unwrap_or(1);
        let rows = self
            .dims
            .iter()
            .skip(1)
            .fold(1u64, |a, &d| a.saturating_mul(d));
        self.ggml_type
            .row_bytes(row)
            .unwrap_or(0)
            .saturating_mul(rows)
    }

    /// The block (layer) index of a `blk.N.…` tensor.
    pub fn block_index(&self) -> Option<u32> {
        let rest = self.name.strip_prefix("blk.")?;
        let (n, _) = rest.split_once('.')?;
        n.parse().ok()
    }
}

/// A parsed GGUF header.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GgufFile {
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
    /// Where the tensor data starts: the header's end padded to `alignment`.
    pub data_offset: u64,
    /// Bytes of the data section the tensors need (last tensor end, padded).
    pub data_bytes: u64,
}

impl GgufFile {
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| GgufError::WrongType {
                key: key.to_owned(),
                found: v.value_type().name(),
                expected: "a non-negative integer",
            }),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.metadata.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| GgufError::WrongType {
                key: key.to_owned(),
                found: v.value_type().name(),
                expected: "a string",
            }),
        }
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(MetaValue::as_str)
    }

    /// Sum of the tensors' data bytes.
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.bytes()))
    }

    /// Sum of the tensors' elements (parameters).
    pub fn parameter_count(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |a, t| a.saturating_add(t.elements()))
    }
}

/// Reads the header of the GGUF file at `path` (never its tensor data) and checks that the
/// file is long enough to hold the data the tensors describe.
pub fn read_gguf(path: &Path, limits: &GgufLimits) -> Result<GgufFile, GgufError> {
    read_gguf_in(path, limits, &ModelAccess::anywhere())
}

/// [`read_gguf`], opening the file through `access` (its roots, its cancellation).
pub fn read_gguf_in(
    path: &Path,
    limits: &GgufLimits,
    access: &ModelAccess,
) -> Result<GgufFile, GgufError> {
    let (_, len, file) = access.open_file(path)?;
    let gguf = parse_gguf(BufReader::with_capacity(64 << 10, file), limits)?;
    let need = gguf.data_offset.saturating_add(gguf.data_bytes);
    // The last tensor's padding may be absent from the file; the tensors' own bytes may not.
    let need_unpadded = gguf.data_offset.saturating_add(
        gguf.tensors
            .iter()
            .map(|t| t.offset.saturating_add(t.bytes()))
            .max()
            .unwrap_or(0),
    );
    if len < need_unpadded {
        return Err(GgufError::DataTruncated { need, have: len });
    }
    Ok(gguf)
}

/// Parses a GGUF header from any buffered reader; reads no further than the header's end.
pub fn parse_gguf<R: BufRead>(reader: R, limits: &GgufLimits) -> Result<GgufFile, GgufError> {
    let mut r = Reader {
        inner: reader,
        pos: 0,
        limits: *limits,
        elements_left: limits.max_array_elements,
        kept: 0,
    };

    let mut magic = [0u8; 4];
    r.bytes(&mut magic, "the magic")?;
    if magic != GGUF_MAGIC {
        return Err(GgufError::BadMagic(magic));
    }
    let version = r.u32("the version")?;
    match version {
        2 | 3 => {}
        v if v.swap_bytes() == 2 || v.swap_bytes() == 3 => return Err(GgufError::BigEndian),
        v => return Err(GgufError::UnsupportedVersion(v)),
    }
    let n_tensors = r.u64("the tensor count")?;
    let n_kv = r.u64("the metadata count")?;
    if n_tensors > limits.max_tensor_count {
        return Err(GgufError::TooLarge {
            what: "tensor count",
            value: n_tensors,
            limit: limits.max_tensor_count,
        });
    }
    if n_kv > limits.max_kv_count {
        return Err(GgufError::TooLarge {
            what: "metadata count",
            value: n_kv,
            limit: limits.max_kv_count,
        });
    }

    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        // The map's entry: the key's String and the value, with the tree's bookkeeping.
        r.keep(
            KEPT_OVERHEAD
                + (std::mem::size_of::<String>() + std::mem::size_of::<MetaValue>()) as u64,
        )?;
        let key = r.string("a metadata key")?;
        let type_id = r.u32("a metadata value type")?;
        let Some(ty) = ValueType::from_id(type_id) else {
            return Err(GgufError::BadValueType {
                key,
                value_type: type_id,
            });
        };
        let value = r.value(ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(GgufError::DuplicateKey(key));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(MetaValue::U32(a)) => u64::from(*a),
        Some(other) => {
            return Err(GgufError::WrongType {
                key: "general.alignment".into(),
                found: other.value_type().name(),
                expected: "u32",
            });
        }
    };
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(GgufError::BadAlignment(alignment));
    }

    // Capacity grows with what is really read, never with the count the file claims.
    let mut tensors = Vec::with_capacity(usize::try_from(n_tensors.min(4096)).unwrap_or(0));
    let mut names = HashSet::with_capacity(tensors.capacity());
    let mut data_end = 0u64;
    for _ in 0..n_tensors {
        let t = r.tensor_info(alignment)?;
        r.keep(KEPT_OVERHEAD + std::mem::size_of::<TensorInfo>() as u64 + 8 * t.dims.len() as u64)?;
        let end = t
            .offset
            .checked_add(t.bytes())
            .ok_or_else(|| GgufError::BadTensor {
                name: t.name.clone(),
                reason: "offset + size overflows".into(),
            })?;
        data_end = data_end.max(end);
        if !names.insert(t.name.clone()) {
            return Err(GgufError::DuplicateTensor(t.name));
        }
        tensors.push(t);
    }
    let data_offset = pad(r.pos, alignment).ok_or(GgufError::TooLarge {
        what: "header",
        value: r.pos,
        limit: limits.max_header_bytes,
    })?;
    let data_bytes = pad(data_end, alignment).unwrap_or(u64::MAX);

    Ok(GgufFile {
        version,
        alignment,
        metadata,
        tensors,
        data_offset,
        data_bytes,
    })
}

fn pad(x: u64, align: u64) -> Option<u64> {
    x.checked_add(align - 1).map(|v| v / align * align)
}

struct Reader<R> {
    inner: R,
    pos: u64,
    limits: GgufLimits,
    elements_left: u64,
    /// Memory taken by what was kept so far (about).
    kept: u64,
}

/// What the allocator and the containers add to each thing kept, about.
const KEPT_OVERHEAD: u64 = 16;

impl<R: BufRead> Reader<R> {
    /// Counts `n` more bytes of memory kept; refuses to go past `max_kept_bytes`.
    fn keep(&mut self, n: u64) -> Result<(), GgufError> {
        self.kept = self.kept.saturating_add(n);
        if self.kept > self.limits.max_kept_bytes {
            return Err(GgufError::TooLarge {
                what: "header kept in memory",
                value: self.kept,
                limit: self.limits.max_kept_bytes,
            });
        }
        Ok(())
    }

    /// Refuses to go past the header budget before reading `n` more bytes.
    fn budget(&self, n: u64) -> Result<(), GgufError> {
        let end = self.pos.saturating_add(n);
        if end > self.limits.max_header_bytes {
            return Err(GgufError::TooLarge {
                what: "header",
                value: end,
                limit: self.limits.max_header_bytes,
            });
        }
        Ok(())
    }

    fn bytes(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        self.budget(buf.len() as u64)?;
        match self.inner.read_exact(buf) {
            Ok(()) => {
                self.pos += buf.len() as u64;
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(GgufError::Truncated {
                what,
                offset: self.pos,
            }),
            Err(e) => Err(e.into()),
        }
    }

    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        self.budget(n)?;
        let mut left = n;
        while left > 0 {
            let buf = match self.inner.fill_buf() {
                Ok(b) => b,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if buf.is_empty() {
                return Err(GgufError::Truncated {
                    what,
                    offset: self.pos,
                });
            }
            let k = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            self.inner.consume(k);
            self.pos += k as u64;
            left -= k as u64;
        }
        Ok(())
    }

    fn arr<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.bytes(&mut b, what)?;
        Ok(b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn string_len(&mut self, what: &'static str) -> Result<u64, GgufError> {
        let len = self.u64(what)?;
        if len > self.limits.max_string_len {
            return Err(GgufError::TooLarge {
                what: "string length",
                value: len,
                limit: self.limits.max_string_len,
            });
        }
        self.budget(len)?;
        Ok(len)
    }

    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let len = self.string_len(what)?;
        self.keep(KEPT_OVERHEAD + len)?;
        // Bounded by max_string_len and by the header budget just checked.
        let mut buf = vec![0u8; usize::try_from(len).unwrap_or(0)];
        self.bytes(&mut buf, what)?;
        // GGUF strings are meant to be UTF-8; ggml does not check, so neither do we refuse.
        Ok(match String::from_utf8(buf) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value(&mut self, ty: ValueType, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        const W: &str = "a metadata value";
        Ok(match ty {
            ValueType::U8 => MetaValue::U8(u8::from_le_bytes(self.arr(W)?)),
            ValueType::I8 => MetaValue::I8(i8::from_le_bytes(self.arr(W)?)),
            ValueType::U16 => MetaValue::U16(u16::from_le_bytes(self.arr(W)?)),
            ValueType::I16 => MetaValue::I16(i16::from_le_bytes(self.arr(W)?)),
            ValueType::U32 => MetaValue::U32(u32::from_le_bytes(self.arr(W)?)),
            ValueType::I32 => MetaValue::I32(i32::from_le_bytes(self.arr(W)?)),
            ValueType::F32 => MetaValue::F32(f32::from_le_bytes(self.arr(W)?)),
            ValueType::U64 => MetaValue::U64(u64::from_le_bytes(self.arr(W)?)),
            ValueType::I64 => MetaValue::I64(i64::from_le_bytes(self.arr(W)?)),
            ValueType::F64 => MetaValue::F64(f64::from_le_bytes(self.arr(W)?)),
            ValueType::Bool => {
                let [b] = self.arr::<1>(W)?;
                // ggml writes 0 or 1; anything else is read as true rather than refused.
                MetaValue::Bool(b != 0)
            }
            ValueType::String => MetaValue::String(self.string(W)?),
            ValueType::Array => self.array(key, depth + 1)?,
        })
    }

    fn array(&mut self, key: &str, depth: u32) -> Result<MetaValue, GgufError> {
        if depth > self.limits.max_array_depth {
            return Err(GgufError::TooLarge {
                what: "array nesting",
                value: depth.into(),
                limit: self.limits.max_array_depth.into(),
            });
        }
        let type_id = self.u32("an array element type")?;
        let Some(elem) = ValueType::from_id(type_id) else {
            return Err(GgufError::BadValueType {
                key: key.to_owned(),
                value_type: type_id,
            });
        };
        let len = self.u64("an array length")?;
        if len > self.elements_left {
            return Err(GgufError::TooLarge {
                what: "array elements in the header",
                value: len.saturating_add(self.limits.max_array_elements - self.elements_left),
                limit: self.limits.max_array_elements,
            });
        }
        self.elements_left -= len;
        if let Some(size) = elem.fixed_size() {
            // A fixed-size array must fit in what is left of the header budget, whether kept
            // or skipped: refused before any allocation.
            self.budget(len.saturating_mul(size))?;
        }
        if len > self.limits.keep_array_len {
            match elem.fixed_size() {
                Some(size) => self.skip(len * size, "array data")?,
                None => {
                    for _ in 0..len {
                        match elem {
                            ValueType::String => {
                                let n = self.string_len("a string in an array")?;
                                self.skip(n, "a string in an array")?;
                            }
                            _ => {
                                // Nested arrays are walked; their elements are not kept.
                                let keep = self.limits.keep_array_len;
                                self.limits.keep_array_len = 0;
                                let r = self.array(key, depth + 1);
                                self.limits.keep_array_len = keep;
                                r?;
                            }
                        }
                    }
                }
            }
            return Ok(MetaValue::Skipped { elem, len });
        }
        // len ≤ keep_array_len and ≤ the element budget; capacity is further capped so a
        // hostile length costs nothing before the bytes really arrive.
        let mut items = Vec::with_capacity(usize::try_from(len.min(1024)).unwrap_or(0));
        self.keep(len.saturating_mul(std::mem::size_of::<MetaValue>() as u64))?;
        for _ in 0..len {
            items.push(match elem {
                ValueType::Array => self.array(key, depth + 1)?,
                _ => self.value(elem, key, depth)?,
            });
        }
        Ok(MetaValue::Array { elem, items })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, GgufError> {
        let name = self.string("a tensor name")?;
        let n_dims = self.u32("a tensor's dimension count")?;
        if n_dims > GGML_MAX_DIMS {
            return Err(GgufError::BadTensor {
                name,
                reason: format!("{n_dims} dimensions, at most {GGML_MAX_DIMS} allowed"),
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64("a tensor dimension")?);
        }
        let type_id = self.u32("a tensor type")?;
        let offset = self.u64("a tensor offset")?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(GgufError::BadTensorType { name, type_id });
        };
        // ggml keeps ne as int64_t and requires the element count to fit.
        let mut elements: u64 = 1;
        for &d in &dims {
            if d > i64::MAX as u64 {
                return Err(GgufError::BadTensor {
                    name,
                    reason: format!("dimension {d} is out of range"),
                });
            }
            elements = match elements.checked_mul(d) {
                Some(e) if e <= i64::MAX as u64 => e,
                _ => {
                    return Err(GgufError::BadTensor {
                        name,
                        reason: "element count overflows".into(),
                    });
                }
            };
        }
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_type.block_size() != 0 {
            return Err(GgufError::BadTensor {
                name,
                reason: format!(
                    "row of {row} elements is not a multiple of {}'s block size {}",
                    ggml_type,
                    ggml_type.block_size()
                ),
            });
        }
        let rows = dims.iter().skip(1).try_fold(1u64, |a, &d| a.checked_mul(d));
        let bytes_ok = ggml_type
            .row_bytes(row)
            .zip(rows)
            .and_then(|(b, r)| b.checked_mul(r))
            .is_some();
        if !bytes_ok {
            return Err(GgufError::BadTensor {
                name,
                reason: "byte size overflows".into(),
            });
        }
        if offset % alignment != 0 {
            return Err(GgufError::BadTensor {
                name,
                reason: format!("offset {offset} is not a multiple of the alignment {alignment}"),
            });
        }
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}

// Profiles: what the estimators read, from a parsed header.
/// Profiles a GGUF file; for a split model (`…-00001-of-00003.gguf`) every shard's header is
/// read and the tensors summed.
pub fn profile_from_gguf_path(path: &Path) -> Result<ModelProfile, ProfileError> {
    profile_from_gguf_path_in(path, &ModelAccess::anywhere())
}

/// [`profile_from_gguf_path`], opening every shard through `access`. The shards are read one
/// at a time and only their tensors' sums kept ([`TensorTally`]), so a split model costs
/// one header's memory, not all of them.
pub fn profile_from_gguf_path_in(
    path: &Path,
    access: &ModelAccess,
) -> Result<ModelProfile, ProfileError> {
    let read = |p: &Path, limits: &GgufLimits| {
        read_gguf_in(p, limits, access).map_err(|source| match source {
            GgufError::Refused(e) => ProfileError::Refused(e),
            source => ProfileError::Gguf {
                path: p.to_owned(),
                source,
            },
        })
    };
    let mut file = read(path, &GgufLimits::default())?;
    let mut tally = TensorTally::default();
    tally.add_all(&file.tensors);
    let count = file.get_u64("split.count").ok().flatten().unwrap_or(1);
    if count > 1 {
        let shards = split_paths(path, count).ok_or_else(|| {
            ProfileError::invalid(
                path.display().to_string(),
                format!("split.count is {count} but the name is not NAME-00001-of-NNNNN.gguf"),
            )
        })?;
        file.tensors = Vec::new();
        // Of the other shards only the tensors count: their arrays are skipped unkept.
        let limits = GgufLimits {
            keep_array_len: 0,
            ..GgufLimits::default()
        };
        for shard in shards.iter().skip(1) {
            tally.add_all(&read(shard, &limits)?.tensors);
        }
    }
    profile_with_tensors(&file, &tally)
}

/// What a profile needs of the tensors, summed without keeping them: bytes per block (for
/// blocks up to [`MAX_LAYERS`]), per part of the model and per type, and the parameters.
#[derive(Debug, Default)]
struct TensorTally {
    blocks: Vec<u64>,
    input: u64,
    output: u64,
    output_head: u64,
    embd: u64,
    by_type: Vec<(GgmlType, u64)>,
    parameters: u64,
    total: u64,
}

impl TensorTally {
    fn add_all(&mut self, tensors: &[TensorInfo]) {
        for t in tensors {
            self.add(t);
        }
    }

    fn add(&mut self, t: &TensorInfo) {
        let b = t.bytes();
        self.total = self.total.saturating_add(b);
        self.parameters = self.parameters.saturating_add(t.elements());
        match self.by_type.iter_mut().find(|(ty, _)| *ty == t.ggml_type) {
            Some((_, n)) => *n = n.saturating_add(b),
            None => self.by_type.push((t.ggml_type, b)),
        }
        match t.block_index().map(|i| i as usize) {
            Some(i) if (i as u64) < MAX_LAYERS => {
                if self.blocks.len() <= i {
                    self.blocks.resize(i + 1, 0);
                }
                self.blocks[i] = self.blocks[i].saturating_add(b);
            }
            _ => {
                let base = t.name.split('.').next().unwrap_or("");
                match base {
                    "token_embd" => {
                        self.embd = self.embd.saturating_add(b);
                        self.input = self.input.saturating_add(b);
                    }
                    "position_embd" | "token_types" | "token_embd_norm" => {
                        self.input = self.input.saturating_add(b)
                    }
                    "output" => {
                        self.output_head = self.output_head.saturating_add(b);
                        self.output = self.output.saturating_add(b);
                    }
                    // output_norm, rope_freqs, extra (e.g. next-token) blocks: with the output.
                    _ => self.output = self.output.saturating_add(b),
                }
            }
        }
    }
}

/// `NAME-00001-of-00003.gguf` → the paths of all three shards.
fn split_paths(first: &Path, count: u64) -> Option<Vec<PathBuf>> {
    if count > 10_000 {
        return None;
    }
    let name = first.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (prefix, tail) = stem.rsplit_once("-of-")?;
    let (prefix, _index) = prefix.rsplit_once('-')?;
    if tail.parse::<u64>().ok()? != count {
        return None;
    }
    let dir = first.parent().unwrap_or(Path::new("."));
    Some(
        (1..=count)
            .map(|i| dir.join(format!("{prefix}-{i:05}-of-{count:05}.gguf")))
            .collect(),
    )
}

/// Architectures whose sliding-window layers llama.cpp lays out in a fixed pattern
/// (`hparams.set_swa_pattern(n)`: layer `il` uses the window when `il % n < n − 1`).
fn swa_pattern(arch: &str) -> Option<u32> {
    match arch {
        "gemma2" | "gpt-oss" | "openai-moe" => Some(2),
        "cohere2" => Some(4),
        "gemma3" => Some(6),
        _ => None,
    }
}

/// Builds a profile from a parsed GGUF header; it passes [`ModelProfile::validate`].
pub fn profile_from_gguf(g: &GgufFile) -> Result<ModelProfile, ProfileError> {
    let mut tally = TensorTally::default();
    tally.add_all(&g.tensors);
    profile_with_tensors(g, &tally)
}

/// A profile from a header's metadata and the tensors of all its shards.
fn profile_with_tensors(g: &GgufFile, tally: &TensorTally) -> Result<ModelProfile, ProfileError> {
    let arch = g
        .architecture()
        .ok_or_else(|| ProfileError::Missing("general.architecture".into()))?
        .to_owned();
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| -> Result<Option<u64>, ProfileError> {
        let full = key(k);
        match g.get(&full) {
            None => Ok(None),
            Some(v) => scalar_or_max(v)
                .map(Some)
                .ok_or_else(|| ProfileError::invalid(full, "not a non-negative integer")),
        }
    };
    let u32_of = |k: &str, v: u64| {
        u32::try_from(v).map_err(|_| ProfileError::invalid(key(k), format!("{v} is out of range")))
    };

    let layers = num("block_count")?.ok_or_else(|| ProfileError::Missing(key("block_count")))?;
    let n_layers = layer_count(&key("block_count"), layers)?;
    let n_embd = u32_of(
        "embedding_length",
        num("embedding_length")?.ok_or_else(|| ProfileError::Missing(key("embedding_length")))?,
    )?;
    let n_ff = u32_of(
        "feed_forward_length",
        num("feed_forward_length")?.unwrap_or(0),
    )?;
    let context = num("context_length")?.unwrap_or(0);
    let heads = u32_of(
        "attention.head_count",
        num("attention.head_count")?.unwrap_or(0),
    )?;

    let kv_key = key("attention.head_count_kv");
    let (kv_heads, kv_per_layer) = match g.get(&kv_key) {
        None => (heads, Vec::new()),
        Some(MetaValue::Array { items, .. }) => {
            let per: Vec<u32> = items
                .iter()
                .map(|v| v.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<_>>()
                .ok_or_else(|| ProfileError::invalid(&kv_key, "not a list of head counts"))?;
            // A list of the wrong length is kept for the validator to refuse.
            let max = per.iter().copied().max().unwrap_or(0);
            if per.len() == n_layers as usize && per.iter().all(|&h| h == max) {
                (max, Vec::new())
            } else {
                (max, per)
            }
        }
        Some(v) => (
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| ProfileError::invalid(&kv_key, "not a head count"))?,
            Vec::new(),
        ),
    };
    let head_dim_default = n_embd.checked_div(heads).unwrap_or(0);
    let key_length = match num("attention.key_length")? {
        Some(v) => u32_of("attention.key_length", v)?,
        None => head_dim_default,
    };
    let value_length = match num("attention.value_length")? {
        Some(v) => u32_of("attention.value_length", v)?,
        None => key_length,
    };

    let sliding_window = num("attention.sliding_window")?
        .filter(|&w| w > 0)
        .map(|w| u32_of("attention.sliding_window", w))
        .transpose()?;
    let sliding_layers = match sliding_window {
        None => Vec::new(),
        Some(_) => match g.get(&key("attention.sliding_window_pattern")) {
            Some(MetaValue::Array { items, .. }) if items.len() == n_layers as usize => {
                items.iter().map(|v| v.as_bool().unwrap_or(false)).collect()
            }
            Some(v) if v.as_u64().is_some_and(|p| p > 0 && p <= MAX_LAYERS) => {
                pattern_layers(n_layers, v.as_u64().unwrap_or(1) as u32)
            }
            _ => match swa_pattern(&arch) {
                Some(p) => pattern_layers(n_layers, p),
                // Unknown layout: assume full attention everywhere (over-estimates, safely).
                None => Vec::new(),
            },
        },
    };

    let opt32 = |k: &str| -> Result<Option<u32>, ProfileError> {
        num(k)?.filter(|&v| v > 0).map(|v| u32_of(k, v)).transpose()
    };
    let experts = match num("expert_count")? {
        Some(c) if c > 0 => {
            let expert_ff = opt32("expert_feed_forward_length")?;
            // Shared experts: qwen2moe states their width, deepseek2 their count.
            let shared = match (
                opt32("expert_shared_feed_forward_length")?,
                num("expert_shared_count")?.filter(|&n| n > 0),
            ) {
                (Some(width), _) => Some(width),
                (None, Some(count)) => Some(u32_of(
                    "expert_shared_count",
                    count.saturating_mul(u64::from(expert_ff.unwrap_or(n_ff))),
                )?),
                (None, None) => None,
            };
            Some(Experts {
                count: u32_of("expert_count", c)?,
                used: u32_of("expert_used_count", num("expert_used_count")?.unwrap_or(0))?,
                feed_forward_length: expert_ff,
                shared_feed_forward_length: shared,
                dense_layers: u32_of(
                    "leading_dense_block_count",
                    num("leading_dense_block_count")?
                        .unwrap_or(0)
                        .min(u64::from(n_layers)),
                )?,
            })
        }
        _ => None,
    };
    let kv_lora_rank = opt32("attention.kv_lora_rank")?;
    let q_lora_rank = opt32("attention.q_lora_rank")?;
    let rope_dim = if kv_lora_rank.is_some() {
        opt32("rope.dimension_count")?
    } else {
        None
    };

    let vocab_size = match num("vocab_size")? {
        Some(v) => u32_of("vocab_size", v)?,
        None => g
            .get("tokenizer.ggml.tokens")
            .and_then(MetaValue::array_len)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0),
    };

    // Weights, split the way llama.cpp places them: blocks past the last layer go with the
    // output.
    let n = n_layers as usize;
    let mut layer_bytes = tally.blocks.get(..n).unwrap_or(&tally.blocks).to_vec();
    layer_bytes.resize(n, 0);
    let beyond = tally
        .blocks
        .get(n..)
        .unwrap_or(&[])
        .iter()
        .fold(0u64, |a, &b| a.saturating_add(b));
    let mut output = tally.output.saturating_add(beyond);
    if tally.output_head == 0 {
        // Tied embeddings: llama.cpp duplicates token_embd as the output head.
        output = output.saturating_add(tally.embd);
    }
    let input = tally.input;
    let weight_dtype = tally
        .by_type
        .iter()
        .max_by_key(|(_, n)| *n)
        .map(|(t, _)| t.name().to_owned())
        .unwrap_or_else(|| "unknown".into());

    let profile = ModelProfile {
        format: ProfileFormat::Gguf,
        name: g.get_str("general.name").ok().flatten().map(str::to_owned),
        architecture: arch,
        weight_dtype,
        parameters: tally.parameters,
        weights: WeightBytes {
            total: tally.total,
            input,
            output,
            layers: layer_bytes,
            exact: true,
        },
        layers: n_layers,
        context_length: context,
        embedding_length: n_embd,
        feed_forward_length: n_ff,
        vocab_size,
        attention: Attention {
            heads,
            kv_heads,
            kv_heads_per_layer: kv_per_layer,
            key_length,
            value_length,
            sliding_window,
            sliding_layers,
            kv_lora_rank,
            q_lora_rank,
            rope_dim,
        },
        experts,
    };
    profile.validate()?;
    Ok(profile)
}

/// A number, or the largest of a per-layer list of numbers.
fn scalar_or_max(v: &MetaValue) -> Option<u64> {
    match v {
        MetaValue::Array { items, .. } => {
            let mut max = 0;
            for i in items {
                max = max.max(i.as_u64()?);
            }
            Some(max)
        }
        _ => v.as_u64(),
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A small GGUF writer for tests: valid files, and pieces to break them with.

    use super::MetaValue;

    pub struct Writer {
        pub buf: Vec<u8>,
    }

    impl Writer {
        pub fn header(version: u32, n_tensors: u64, n_kv: u64) -> Self {
            let mut buf = b"GGUF".to_vec();
            buf.extend(version.to_le_bytes());
            buf.extend(n_tensors.to_le_bytes());
            buf.extend(n_kv.to_le_bytes());
            Self { buf }
        }

        pub fn string(&mut self, s: &str) {
            self.buf.extend((s.len() as u64).to_le_bytes());
            self.buf.extend(s.as_bytes());
        }

        pub fn u32(&mut self, v: u32) {
            self.buf.extend(v.to_le_bytes());
        }

        pub fn u64(&mut self, v: u64) {
            self.buf.extend(v.to_le_bytes());
        }

        pub fn kv(&mut self, key: &str, v: &MetaValue) {
            self.string(key);
            self.u32(v.value_type().id());
            self.value(v);
        }

        pub fn value(&mut self, v: &MetaValue) {
            match v {
                MetaValue::U8(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::I8(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::U16(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::I16(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::U32(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::I32(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::F32(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::U64(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::I64(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::F64(x) => self.buf.extend(x.to_le_bytes()),
                MetaValue::Bool(x) => self.buf.push(u8::from(*x)),
                MetaValue::String(s) => self.string(s),
                MetaValue::Array { elem, items } => {
                    self.u32(elem.id());
                    self.u64(items.len() as u64);
                    for i in items {
                        self.value(i);
                    }
                }
                MetaValue::Skipped { .. } => panic!("cannot write a skipped array"),
            }
        }

        pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) {
            self.string(name);
            self.u32(dims.len() as u32);
            for d in dims {
                self.u64(*d);
            }
            self.u32(type_id);
            self.u64(offset);
        }

        /// Pads to `align` and appends `data_bytes` zero bytes of tensor data.
        pub fn finish(mut self, align: usize, data_bytes: usize) -> Vec<u8> {
            while !self.buf.len().is_multiple_of(align) {
                self.buf.push(0);
            }
            self.buf.resize(self.buf.len() + data_bytes, 0);
            self.buf
        }
    }

    pub fn string(s: &str) -> MetaValue {
        MetaValue::String(s.into())
    }

    pub fn strings(items: &[&str]) -> MetaValue {
        MetaValue::Array {
            elem: super::ValueType::String,
            items: items.iter().map(|s| string(s)).collect(),
        }
    }

    pub struct Tensor {
        pub name: String,
        pub dims: Vec<u64>,
        pub ty: super::GgmlType,
    }

    /// A complete, valid GGUF file: the metadata given, then the tensors laid out in order,
    /// each at an aligned offset, with zeroed data.
    pub fn file(version: u32, kvs: &[(&str, MetaValue)], tensors: &[Tensor]) -> Vec<u8> {
        let mut w = Writer::header(version, tensors.len() as u64, kvs.len() as u64);
        for (k, v) in kvs {
            w.kv(k, v);
        }
        let mut offset = 0u64;
        for t in tensors {
            w.tensor(&t.name, &t.dims, t.ty.id(), offset);
            let n = t.dims.iter().product::<u64>();
            let bytes = t.ty.row_bytes(t.dims[0]).unwrap() * (n / t.dims[0]);
            offset += bytes.div_ceil(32) * 32;
        }
        w.finish(32, offset as usize)
    }

    /// A small llama-shaped model: 2 blocks, GQA, Q4_0 matrices, tied output.
    pub fn tiny_llama(version: u32) -> Vec<u8> {
        use super::GgmlType as G;
        let n_embd = 64u64;
        let n_ff = 128u64;
        let n_vocab = 256u64;
        let n_kv_dim = 32u64; // 2 kv heads × 16
        let kvs = vec![
            ("general.architecture", string("llama")),
            ("general.name", string("tiny")),
            ("general.file_type", MetaValue::U32(2)),
            ("llama.block_count", MetaValue::U32(2)),
            ("llama.context_length", MetaValue::U32(2048)),
            ("llama.embedding_length", MetaValue::U32(n_embd as u32)),
            ("llama.feed_forward_length", MetaValue::U32(n_ff as u32)),
            ("llama.attention.head_count", MetaValue::U32(4)),
            ("llama.attention.head_count_kv", MetaValue::U32(2)),
            ("llama.vocab_size", MetaValue::U32(n_vocab as u32)),
            ("tokenizer.ggml.tokens", strings(&["<s>", "</s>", "a", "b"])),
            (
                "nested",
                MetaValue::Array {
                    elem: super::ValueType::Array,
                    items: vec![
                        MetaValue::Array {
                            elem: super::ValueType::I16,
                            items: vec![MetaValue::I16(-1), MetaValue::I16(2)],
                        },
                        MetaValue::Array {
                            elem: super::ValueType::Bool,
                            items: vec![MetaValue::Bool(true)],
                        },
                    ],
                },
            ),
            ("f64", MetaValue::F64(0.5)),
            ("i64", MetaValue::I64(-7)),
            ("u8", MetaValue::U8(7)),
            ("i8", MetaValue::I8(-7)),
            ("u16", MetaValue::U16(700)),
            ("u64", MetaValue::U64(1 << 40)),
            ("f32", MetaValue::F32(1.5)),
        ];
        let t = |name: &str, dims: &[u64], ty| Tensor {
            name: name.into(),
            dims: dims.to_vec(),
            ty,
        };
        let mut tensors = vec![t("token_embd.weight", &[n_embd, n_vocab], G::Q8_0)];
        for b in 0..2 {
            let p = |s: &str| format!("blk.{b}.{s}");
            tensors.push(t(&p("attn_norm.weight"), &[n_embd], G::F32));
            tensors.push(t(&p("attn_q.weight"), &[n_embd, n_embd], G::Q4_0));
            tensors.push(t(&p("attn_k.weight"), &[n_embd, n_kv_dim], G::Q4_0));
            tensors.push(t(&p("attn_v.weight"), &[n_embd, n_kv_dim], G::Q4_0));
            tensors.push(t(&p("attn_output.weight"), &[n_embd, n_embd], G::Q4_0));
            tensors.push(t(&p("ffn_norm.weight"), &[n_embd], G::F32));
            tensors.push(t(
                &p("ffn_gate.weight"),
                &[n_embd, n_ff],
                G::Q4_K.min_for(n_embd),
            ));
            tensors.push(t(&p("ffn_up.weight"), &[n_embd, n_ff], G::Q4_0));
            tensors.push(t(
                &p("ffn_down.weight"),
                &[n_ff, n_embd],
                G::Q6_K.min_for(n_ff),
            ));
        }
        tensors.push(t("output_norm.weight", &[n_embd], G::F32));
        file(version, &kvs, &tensors)
    }

    impl super::GgmlType {
        /// This type when a row of `n` fits its blocks, else Q8_0 (tiny test rows are shorter
        /// than a K-quant super-block).
        pub fn min_for(self, n: u64) -> Self {
            if n.is_multiple_of(self.block_size()) {
                self
            } else {
                super::GgmlType::Q8_0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use proptest::prelude::*;

    fn parse(bytes: &[u8]) -> Result<GgufFile, GgufError> {
        parse_gguf(bytes, &GgufLimits::default())
    }

    #[test]
    fn type_table_matches_ggml() {
        // Spot checks against ggml-common.h's static_asserts.
        let expect = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q8_1, 32, 36),
            (GgmlType::Q2_K, 256, 84),
            (GgmlType::Q3_K, 256, 110),
            (GgmlType::Q4_K, 256, 144),
            (GgmlType::Q5_K, 256, 176),
            (GgmlType::Q6_K, 256, 210),
            (GgmlType::Q8_K, 256, 292),
            (GgmlType::IQ2_XXS, 256, 66),
            (GgmlType::IQ2_XS, 256, 74),
            (GgmlType::IQ3_XXS, 256, 98),
            (GgmlType::IQ1_S, 256, 50),
            (GgmlType::IQ4_NL, 32, 18),
            (GgmlType::IQ3_S, 256, 110),
            (GgmlType::IQ2_S, 256, 82),
            (GgmlType::IQ4_XS, 256, 136),
            (GgmlType::IQ1_M, 256, 56),
            (GgmlType::BF16, 1, 2),
            (GgmlType::TQ1_0, 256, 54),
            (GgmlType::TQ2_0, 256, 66),
            (GgmlType::MXFP4, 32, 17),
            (GgmlType::NVFP4, 64, 36),
            (GgmlType::Q1_0, 128, 18),
        ];
        for (t, bs, ts) in expect {
            assert_eq!((t.block_size(), t.type_size()), (bs, ts), "{t}");
        }
        // Every variant has exactly one row and round-trips through its id and name.
        for t in GgmlType::all() {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()), Some(t));
            assert_eq!(GGML_TYPES.iter().filter(|r| r.1 == t).count(), 1);
        }
        for removed in [4, 5, 31, 32, 33, 36, 37, 38, 1000] {
            assert_eq!(GgmlType::from_id(removed), None);
        }
        assert!((GgmlType::Q4_K.bits_per_weight() - 4.5).abs() < 1e-9);
    }

    #[test]
    fn reads_a_valid_file_v3_and_v2() {
        for version in [2, 3] {
            let bytes = tiny_llama(version);
            let g = parse(&bytes).unwrap();
            assert_eq!(g.version, version);
            assert_eq!(g.alignment, 32);
            assert_eq!(g.architecture(), Some("llama"));
            assert_eq!(g.get_u64("llama.block_count").unwrap(), Some(2));
            assert_eq!(g.tensors.len(), 1 + 2 * 9 + 1);
            assert_eq!(g.data_offset % 32, 0);
            assert_eq!(g.data_offset + g.data_bytes, bytes.len() as u64);
            let tok = g.get("tokenizer.ggml.tokens").unwrap();
            assert_eq!(tok.array_len(), Some(4));
            assert_eq!(tok.as_array().unwrap()[2].as_str(), Some("a"));
            let nested = g.get("nested").unwrap().as_array().unwrap();
            assert_eq!(nested[0].as_array().unwrap()[0], MetaValue::I16(-1));
            assert_eq!(g.get("f64"), Some(&MetaValue::F64(0.5)));
            assert_eq!(g.get("i64"), Some(&MetaValue::I64(-7)));
            assert_eq!(g.get("i64").unwrap().as_u64(), None);
            assert_eq!(g.get("u64").unwrap().as_u64(), Some(1 << 40));
            assert_eq!(g.get("u16").unwrap().as_u64(), Some(700));
            let t = g
                .tensors
                .iter()
                .find(|t| t.name == "blk.1.attn_q.weight")
                .unwrap();
            assert_eq!(t.block_index(), Some(1));
            assert_eq!(t.bytes(), 64 * 64 / 32 * 18);
            assert_eq!(t.elements(), 64 * 64);
        }
    }

    #[test]
    fn long_arrays_are_skipped_but_counted() {
        let tokens: Vec<String> = (0..5000).map(|i| format!("t{i}")).collect();
        let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let ids = MetaValue::Array {
            elem: ValueType::I32,
            items: (0..5000).map(MetaValue::I32).collect(),
        };
        let bytes = file(
            3,
            &[
                ("general.architecture", string("llama")),
                ("tokenizer.ggml.tokens", strings(&refs)),
                ("ids", ids),
                ("after", MetaValue::U32(9)),
            ],
            &[],
        );
        let g = parse(&bytes).unwrap();
        assert_eq!(
            g.get("tokenizer.ggml.tokens"),
            Some(&MetaValue::Skipped {
                elem: ValueType::String,
                len: 5000
            })
        );
        assert_eq!(g.get("ids").unwrap().array_len(), Some(5000));
        assert_eq!(g.get_u64("after").unwrap(), Some(9));
        let all = parse_gguf(&bytes[..], &GgufLimits::keep_all_arrays()).unwrap();
        let kept = all
            .get("tokenizer.ggml.tokens")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(kept[4999].as_str(), Some("t4999"));
    }

    #[test]
    fn custom_alignment() {
        let mut w = Writer::header(3, 1, 1);
        w.kv("general.alignment", &MetaValue::U32(64));
        w.tensor("x", &[32], GgmlType::F32.id(), 0);
        let bytes = w.finish(64, 128);
        let g = parse(&bytes).unwrap();
        assert_eq!(g.alignment, 64);
        assert_eq!(g.data_offset % 64, 0);
        assert_eq!(g.data_bytes, 128);

        for (bad, why) in [(MetaValue::U32(48), "power"), (MetaValue::U64(32), "u32")] {
            let mut w = Writer::header(3, 0, 1);
            w.kv("general.alignment", &bad);
            let err = parse(&w.finish(32, 0)).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        }
    }

    #[test]
    fn clear_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"GGML\x03\0\0\0".to_vec(), "not a GGUF file"),
            (Writer::header(1, 0, 0).buf, "version 1 is not supported"),
            (Writer::header(7, 0, 0).buf, "version 7"),
            (
                Writer::header(3u32.swap_bytes(), 0, 0).buf,
                "big-endian GGUF files",
            ),
            (tiny_llama(3)[..100].to_vec(), "file ends early"),
            (Writer::header(3, u64::MAX, 0).buf, "tensor count too large"),
            (
                Writer::header(3, 0, u64::MAX).buf,
                "metadata count too large",
            ),
            (
                {
                    let mut w = Writer::header(3, 0, 1);
                    w.u64(u64::MAX); // key length
                    w.buf
                },
                "string length too large",
            ),
            (
                {
                    let mut w = Writer::header(3, 0, 1);
                    w.string("k");
                    w.u32(13);
                    w.buf
                },
                "unknown value type 13",
            ),
            (
                {
                    let mut w = Writer::header(3, 0, 1);
                    w.string("k");
                    w.u32(9);
                    w.u32(0);
                    w.u64(u64::MAX / 2);
                    w.buf
                },
                "array elements in the header too large",
            ),
            (
                {
                    let mut w = Writer::header(3, 0, 1);
                    w.string("k");
                    w.u32(9);
                    w.u32(10);
                    w.u64(1 << 22); // 4M u64s = 32 MiB: within the element budget
                    w.buf
                },
                "file ends early",
            ),
            (
                {
                    let mut w = Writer::header(3, 0, 1);
                    w.string("k");
                    w.u32(9); // an array
                    for _ in 0..10 {
                        w.u32(9); // of arrays
                        w.u64(1);
                    }
                    w.buf
                },
                "array nesting too large",
            ),
            (
                {
                    let mut w = Writer::header(3, 0, 2);
                    w.kv("a", &MetaValue::U8(1));
                    w.kv("a", &MetaValue::U8(2));
                    w.buf
                },
                "appears twice",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[1, 1, 1, 1, 1], 0, 0);
                    w.buf
                },
                "5 dimensions",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[32], 4, 0);
                    w.buf
                },
                "unknown or removed ggml type 4",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[33], GgmlType::Q4_0.id(), 0);
                    w.buf
                },
                "not a multiple of Q4_0's block size",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[1 << 32, 1 << 32], 0, 0);
                    w.buf
                },
                "element count overflows",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[u64::MAX], 0, 0);
                    w.buf
                },
                "out of range",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[0, 1 << 40, 1 << 40], 0, 0);
                    w.buf
                },
                "byte size overflows",
            ),
            (
                {
                    let mut w = Writer::header(3, 1, 0);
                    w.tensor("t", &[32], 0, 3);
                    w.buf
                },
                "not a multiple of the alignment",
            ),
            (
                {
                    let mut w = Writer::header(3, 2, 0);
                    w.tensor("t", &[32], 0, 0);
                    w.tensor("t", &[32], 0, 128);
                    w.buf
                },
                "tensor \"t\" appears twice",
            ),
        ];
        for (bytes, want) in cases {
            let err = parse(&bytes).unwrap_err().to_string();
            assert!(err.contains(want), "want {want:?}, got {err:?}");
        }
    }

    #[test]
    fn header_budget_is_enforced() {
        let limits = GgufLimits {
            max_header_bytes: 200,
            ..GgufLimits::default()
        };
        let err = parse_gguf(&tiny_llama(3)[..], &limits).unwrap_err();
        assert!(
            matches!(err, GgufError::TooLarge { what: "header", .. }),
            "{err}"
        );
    }

    #[test]
    fn file_shorter_than_its_tensors_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let bytes = tiny_llama(3);
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let err = read_gguf(&path, &GgufLimits::default()).unwrap_err();
        assert!(matches!(err, GgufError::DataTruncated { .. }), "{err}");
        std::fs::write(&path, &bytes).unwrap();
        read_gguf(&path, &GgufLimits::default()).unwrap();
    }

    /// One way to damage a file.
    #[derive(Debug, Clone)]
    enum Damage {
        Flip {
            at: usize,
            xor: u8,
        },
        Truncate {
            at: usize,
        },
        /// Overwrite 8 bytes with a huge little-endian length.
        HugeLen {
            at: usize,
            len: u64,
        },
        Insert {
            at: usize,
            bytes: Vec<u8>,
        },
    }

    fn damage() -> impl Strategy<Value = Damage> {
        prop_oneof![
            (any::<usize>(), 1u8..).prop_map(|(at, xor)| Damage::Flip { at, xor }),
            any::<usize>().prop_map(|at| Damage::Truncate { at }),
            (
                any::<usize>(),
                prop_oneof![
                    Just(u64::MAX),
                    Just(1u64 << 32),
                    Just(1u64 << 24),
                    Just(i64::MAX as u64),
                    any::<u64>()
                ]
            )
                .prop_map(|(at, len)| Damage::HugeLen { at, len }),
            (
                any::<usize>(),
                proptest::collection::vec(any::<u8>(), 1..16)
            )
                .prop_map(|(at, bytes)| Damage::Insert { at, bytes }),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, d: &Damage) {
        let n = bytes.len();
        match d {
            Damage::Flip { at, xor } => bytes[at % n] ^= xor,
            Damage::Truncate { at } => bytes.truncate(at % n),
            Damage::HugeLen { at, len } => {
                let at = at % n.saturating_sub(8).max(1);
                let end = (at + 8).min(n);
                bytes[at..end].copy_from_slice(&len.to_le_bytes()[..end - at]);
            }
            Damage::Insert { at, bytes: ins } => {
                let at = at % n;
                bytes.splice(at..at, ins.iter().copied());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, .. ProptestConfig::default() })]

        /// Damaged headers never panic and always end quickly, in a value or an error.
        #[test]
        fn damaged_headers_never_panic(
            v2 in any::<bool>(),
            damages in proptest::collection::vec(damage(), 1..4),
        ) {
            let mut bytes = tiny_llama(if v2 { 2 } else { 3 });
            for d in &damages {
                apply(&mut bytes, d);
                if bytes.is_empty() { break; }
            }
            let start = std::time::Instant::now();
            if let Ok(g) = parse(&bytes) {
                // Whatever parses must also profile and estimate without panicking.
                if let Ok(p) = profile_from_gguf(&g) {
                    for opts in [
                        berth_options::EstimateOptions::LlamaCpp(Default::default()),
                        berth_options::EstimateOptions::Vllm(Default::default()),
                    ] {
                        if let Ok(e) = crate::estimate(&p, &opts) {
                            let _ = e.to_table();
                        }
                    }
                }
            }
            let _ = parse_gguf(&bytes[..], &GgufLimits::keep_all_arrays());
            prop_assert!(start.elapsed() < std::time::Duration::from_secs(2));
        }

        /// Random bytes after a valid magic and version: same.
        #[test]
        fn random_tails_never_panic(v2 in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = Writer::header(if v2 { 2 } else { 3 }, 0, 0).buf;
            bytes.truncate(8);
            bytes.extend(tail);
            let _ = parse(&bytes);
        }
    }
}

#[cfg(test)]
mod profile_tests {
    use super::testutil::*;
    use super::*;
    use crate::read::profile_from_path;

    #[test]
    fn profile_of_the_tiny_llama() {
        let bytes = tiny_llama(3);
        let g = parse_gguf(&bytes[..], &GgufLimits::default()).unwrap();
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!(p.format, ProfileFormat::Gguf);
        assert_eq!(p.architecture, "llama");
        assert_eq!(p.name.as_deref(), Some("tiny"));
        assert_eq!(p.layers, 2);
        assert_eq!(p.context_length, 2048);
        assert_eq!(p.embedding_length, 64);
        assert_eq!(p.feed_forward_length, 128);
        assert_eq!(p.vocab_size, 256);
        assert_eq!(p.attention.heads, 4);
        assert_eq!(p.attention.kv_heads, 2);
        assert_eq!(p.attention.key_length, 16);
        assert_eq!(p.attention.value_length, 16);
        assert_eq!(p.experts, None);
        let embd = GgmlType::Q8_0.row_bytes(64).unwrap() * 256;
        assert_eq!(p.weights.input, embd);
        // Tied: the output head is the embedding copy, plus the norm.
        assert_eq!(p.weights.output, embd + 64 * 4);
        assert_eq!(
            p.weights.total,
            p.weights.input + p.weights.layers.iter().sum::<u64>() + 64 * 4
        );
        assert_eq!(p.weights.layers[0], p.weights.layers[1]);
        assert_eq!(p.parameters, g.parameter_count());
        // The profile survives JSON.
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<ModelProfile>(&json).unwrap(), p);
    }

    fn arch_file(arch: &str, extra: Vec<(String, MetaValue)>) -> GgufFile {
        let mut kvs: Vec<(String, MetaValue)> = vec![
            ("general.architecture".into(), string(arch)),
            (format!("{arch}.block_count"), MetaValue::U32(12)),
            (format!("{arch}.embedding_length"), MetaValue::U32(1024)),
            (format!("{arch}.attention.head_count"), MetaValue::U32(8)),
        ];
        kvs.extend(extra);
        let refs: Vec<(&str, MetaValue)> =
            kvs.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let bytes = file(3, &refs, &[]);
        parse_gguf(&bytes[..], &GgufLimits::default()).unwrap()
    }

    #[test]
    fn sliding_window_patterns() {
        let g = arch_file(
            "gemma3",
            vec![(
                "gemma3.attention.sliding_window".into(),
                MetaValue::U32(1024),
            )],
        );
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!(p.attention.sliding_window, Some(1024));
        let full: Vec<usize> = (0..12).filter(|&i| !p.is_sliding(i)).collect();
        assert_eq!(full, vec![5, 11]);

        // An explicit pattern array wins; an unknown architecture without one slides nowhere.
        let pattern = MetaValue::Array {
            elem: ValueType::Bool,
            items: (0..12).map(|i| MetaValue::Bool(i % 3 != 0)).collect(),
        };
        let g = arch_file(
            "newarch",
            vec![
                (
                    "newarch.attention.sliding_window".into(),
                    MetaValue::U32(64),
                ),
                ("newarch.attention.sliding_window_pattern".into(), pattern),
            ],
        );
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!((0..12).filter(|&i| p.is_sliding(i)).count(), 8);
        let g = arch_file(
            "newarch",
            vec![(
                "newarch.attention.sliding_window".into(),
                MetaValue::U32(64),
            )],
        );
        assert_eq!(
            (0..12)
                .filter(|&i| profile_from_gguf(&g).unwrap().is_sliding(i))
                .count(),
            0
        );
    }

    #[test]
    fn per_layer_kv_heads_moe_and_mla() {
        let kv = MetaValue::Array {
            elem: ValueType::U32,
            items: (0..12)
                .map(|i| MetaValue::U32(if i % 4 == 3 { 0 } else { 2 }))
                .collect(),
        };
        let g = arch_file(
            "deepseek2",
            vec![
                ("deepseek2.attention.head_count_kv".into(), kv),
                ("deepseek2.expert_count".into(), MetaValue::U32(64)),
                ("deepseek2.expert_used_count".into(), MetaValue::U32(6)),
                (
                    "deepseek2.expert_feed_forward_length".into(),
                    MetaValue::U32(1408),
                ),
                ("deepseek2.expert_shared_count".into(), MetaValue::U32(2)),
                (
                    "deepseek2.leading_dense_block_count".into(),
                    MetaValue::U32(1),
                ),
                (
                    "deepseek2.attention.kv_lora_rank".into(),
                    MetaValue::U32(512),
                ),
                (
                    "deepseek2.attention.q_lora_rank".into(),
                    MetaValue::U32(1536),
                ),
                ("deepseek2.rope.dimension_count".into(), MetaValue::U32(64)),
                ("deepseek2.attention.key_length".into(), MetaValue::U32(576)),
                (
                    "deepseek2.attention.value_length".into(),
                    MetaValue::U32(512),
                ),
            ],
        );
        let p = profile_from_gguf(&g).unwrap();
        assert_eq!(p.attention.kv_heads, 2);
        assert_eq!(p.kv_heads_of(3), 0);
        assert_eq!(p.kv_heads_of(4), 2);
        assert_eq!(
            p.experts,
            Some(Experts {
                count: 64,
                used: 6,
                feed_forward_length: Some(1408),
                shared_feed_forward_length: Some(2 * 1408),
                dense_layers: 1,
            })
        );
        assert_eq!(p.attention.kv_lora_rank, Some(512));
        assert_eq!(p.attention.q_lora_rank, Some(1536));
        assert_eq!(p.attention.rope_dim, Some(64));
        assert_eq!(
            (p.attention.key_length, p.attention.value_length),
            (576, 512)
        );
    }

    #[test]
    fn bad_architecture_values_are_errors() {
        for (k, v, want) in [
            ("x.block_count", MetaValue::U64(1 << 40), "layers"),
            (
                "x.block_count",
                string("many"),
                "not a non-negative integer",
            ),
            (
                "x.embedding_length",
                MetaValue::U64(1 << 40),
                "out of range",
            ),
        ] {
            let g = arch_file("x", vec![]);
            let mut g = g;
            g.metadata.insert(k.into(), v);
            let err = profile_from_gguf(&g).unwrap_err().to_string();
            assert!(err.contains(want), "{k}: {err}");
        }
        let mut g = arch_file("x", vec![]);
        g.metadata.remove("general.architecture");
        assert!(matches!(
            profile_from_gguf(&g),
            Err(ProfileError::Missing(_))
        ));
    }

    #[test]
    fn split_names() {
        let v = split_paths(Path::new("/m/Big-Q4_K_M-00001-of-00003.gguf"), 3).unwrap();
        assert_eq!(v[2], Path::new("/m/Big-Q4_K_M-00003-of-00003.gguf"));
        assert!(split_paths(Path::new("/m/Big.gguf"), 3).is_none());
        assert!(split_paths(Path::new("/m/Big-00001-of-00002.gguf"), 3).is_none());
    }

    #[test]
    fn split_files_are_summed() {
        let dir = tempfile::tempdir().unwrap();
        let t = |name: &str| Tensor {
            name: name.into(),
            dims: vec![32, 4],
            ty: GgmlType::F16,
        };
        let meta = |idx: u16| {
            vec![
                ("general.architecture", string("llama")),
                ("llama.block_count", MetaValue::U32(2)),
                ("llama.embedding_length", MetaValue::U32(32)),
                ("split.count", MetaValue::U16(2)),
                ("split.no", MetaValue::U16(idx)),
            ]
        };
        let a = file(3, &meta(0), &[t("blk.0.attn_q.weight")]);
        let b = file(3, &meta(1), &[t("blk.1.attn_q.weight")]);
        let first = dir.path().join("m-00001-of-00002.gguf");
        std::fs::write(&first, a).unwrap();
        let second = dir.path().join("m-00002-of-00002.gguf");
        std::fs::write(&second, b).unwrap();
        let p = profile_from_path(&first).unwrap();
        assert_eq!(p.weights.layers, vec![256, 256]);
        // A shard under the first one's name that leaves the model root is refused like any
        // file outside it.
        let outside = tempfile::tempdir().unwrap();
        std::fs::rename(&second, outside.path().join("real")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("real"), &second).unwrap();
        assert_eq!(
            profile_from_path(&first).unwrap().weights.layers,
            vec![256, 256]
        );
        let roots = crate::ModelRoots::new([dir.path()]).unwrap();
        let access = crate::ModelAccess::new(roots, crate::ReadCancel::new());
        let e = crate::read_profile(&first, &access).unwrap_err();
        assert!(
            matches!(&e, ProfileError::Refused(crate::OpenError::NotUnderRoot(_))),
            "{e:?}"
        );
        std::fs::remove_file(&second).unwrap();
        assert!(matches!(
            profile_from_path(&first),
            Err(ProfileError::Refused(crate::OpenError::Io { .. }))
        ));
    }

    #[test]
    fn many_tiny_kept_values_are_bounded_in_memory() {
        // 60k one-byte values in short arrays: 60 KiB of file, ~2 MiB of MetaValues kept.
        let arrays: Vec<(String, MetaValue)> = (0..15_000)
            .map(|i| {
                (
                    format!("k{i}"),
                    MetaValue::Array {
                        elem: ValueType::U8,
                        items: vec![MetaValue::U8(1); 4],
                    },
                )
            })
            .collect();
        let kvs: Vec<(&str, MetaValue)> = arrays
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let bytes = file(3, &kvs, &[]);
        let limits = GgufLimits {
            max_kept_bytes: 1 << 20,
            ..GgufLimits::default()
        };
        let e = parse_gguf(&bytes[..], &limits).unwrap_err();
        assert!(e.to_string().contains("kept in memory"), "{e}");
        parse_gguf(&bytes[..], &GgufLimits::default()).unwrap();
    }
}
