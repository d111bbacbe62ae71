//! Reads a Hugging Face checkpoint folder without reading tensor data: config.json and the
//! safetensors headers (one `model.safetensors`, or the shards that
//! `model.safetensors.index.json` names). Every header is checked: length within the file,
//! valid JSON, known dtypes, offsets inside the data section, byte counts equal to
//! shape x dtype, no overlapping tensors. Other `.safetensors` files in the folder (e.g. a
//! fixture's `reference.safetensors`) are not weights and are ignored.
//!
//! A quantized checkpoint (`vlmem quantize`) stores a block-quantized matrix as a `U8`
//! tensor of shape `[rows..., row_bytes]` and names its format in the header's
//! `__metadata__` under `vlmem.format.<tensor name>` (e.g. `"q8_0"`); [`TensorInfo`] then
//! gives the matrix's own shape (`[rows..., cols]`) and its [`WeightFormat`].
//!
//! Writing such files is [`mod@write`]'s ([`ShardWriter`], [`write_sharded`]).

pub mod write;

pub use write::{ShardTensor, ShardWriter, WrittenShards, pt_metadata, write_sharded};

use crate::config::Qwen3VlConfig;
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use crate::tensors::{Dtype, TensorClass, layer_of_name};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// safetensors' own limit on the header size.
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// The weights of a checkpoint held in one file.
pub const SINGLE_FILE: &str = "model.safetensors";

/// The index of a sharded checkpoint: each tensor's shard.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The `__metadata__` key prefix that names a tensor's block format: the key
/// `vlmem.format.<tensor name>` holds the format's name (e.g. `"q8_0"`).
pub const FORMAT_KEY_PREFIX: &str = "vlmem.format.";

/// One tensor as stored in a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Stored element type (`U8` for a block-quantized matrix).
    pub dtype: Dtype,
    /// The format its bytes hold, as the kernels read them: the dtype's plain format, or
    /// the block format the header names; `None` for types that are not weights (integers).
    pub format: Option<WeightFormat>,
    /// Dimensions of the values (for a block-quantized matrix, `[rows..., cols]`, not the
    /// stored bytes' shape).
    pub shape: Vec<u64>,
    /// Bytes of data.
    pub bytes: u64,
    /// What it is part of (`None` for names that are not Qwen3-VL weights).
    pub class: Option<TensorClass>,
    /// Decoder layer, for text-layer tensors.
    pub layer: Option<u64>,
    /// The file holding it.
    pub file: PathBuf,
    /// Offset of its first byte from the start of the file.
    pub file_offset_bytes: u64,
}

/// A checkpoint folder: its config and every weight's location.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The folder.
    pub dir: PathBuf,
    /// Its config.json.
    pub config: Qwen3VlConfig,
    /// Every weight, ordered by file then offset.
    pub tensors: Vec<TensorInfo>,
    /// The weight files read.
    pub files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Opens a checkpoint folder: config.json plus model.safetensors or the sharded index.
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                message: "no such checkpoint folder".into(),
            });
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                message: "no config.json in this folder: is it a Hugging Face checkpoint?".into(),
            });
        }
        let config = Qwen3VlConfig::from_file(&config_path)?;
        let files = weight_files(dir)?;
        let mut tensors = Vec::new();
        for f in &files {
            tensors.extend(read_header(f)?);
        }
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            check_index_covers(&index, &tensors)?;
        }
        let mut seen = BTreeSet::new();
        if let Some(dup) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
            return Err(Error::safetensors(
                &dup.file,
                format!("tensor {} appears in more than one shard", dup.name),
            ));
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            config,
            tensors,
            files,
        })
    }

    /// Sum of every weight's data bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.bytes).sum()
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The weight files of a folder: the shards named by model.safetensors.index.json, else
/// model.safetensors.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let map = read_index(&index)?;
        let shards: BTreeSet<&String> = map.values().collect();
        let mut files = Vec::new();
        for s in shards {
            if s.contains('/') || s.contains('\\') || s == ".." {
                return Err(Error::safetensors(
                    &index,
                    format!("shard name '{s}' is not a plain file name"),
                ));
            }
            let p = dir.join(s);
            if !p.is_file() {
                return Err(Error::Missing {
                    path: p,
                    message: "shard named by model.safetensors.index.json is missing".into(),
                });
            }
            files.push(p);
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(Error::Missing {
        path: dir.to_path_buf(),
        message: "no model.safetensors and no model.safetensors.index.json".into(),
    })
}

/// The `weight_map` of an index file: tensor name to shard file name.
pub fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_index(&text).map_err(|m| Error::safetensors(path, m))
}

/// Parses the text of a `model.safetensors.index.json`: its `weight_map` (tensor name to
/// shard file name). Never panics, whatever the text.
pub fn parse_index(text: &str) -> std::result::Result<BTreeMap<String, String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let idx: Index = serde_json::from_str(text).map_err(|e| format!("index is not valid: {e}"))?;
    if idx.weight_map.is_empty() {
        return Err("index has an empty weight_map".into());
    }
    Ok(idx.weight_map)
}

fn check_index_covers(index: &Path, tensors: &[TensorInfo]) -> Result<()> {
    let map = read_index(index)?;
    for (name, shard) in &map {
        let found = tensors.iter().find(|t| &t.name == name);
        match found {
            Some(t) if t.file.file_name().and_then(|f| f.to_str()) == Some(shard.as_str()) => {}
            Some(t) => {
                return Err(Error::safetensors(
                    index,
                    format!(
                        "{name} is mapped to {shard} but lies in {}",
                        t.file.display()
                    ),
                ));
            }
            None => {
                return Err(Error::safetensors(
                    index,
                    format!("{name} is mapped to {shard} but that shard does not hold it"),
                ));
            }
        }
    }
    Ok(())
}

/// Reads and checks one safetensors file's header; no tensor data is read.
pub fn read_header(path: &Path) -> Result<Vec<TensorInfo>> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut len_buf = [0u8; 8];
    file.read_exact(&mut len_buf).map_err(|_| {
        Error::safetensors(
            path,
            format!("file is {file_len} bytes, too short for a header"),
        )
    })?;
    let header_len = u64::from_le_bytes(len_buf);
    if header_len > MAX_HEADER_BYTES {
        return Err(Error::safetensors(
            path,
            format!("header length {header_len} exceeds the 100 MiB limit"),
        ));
    }
    let data_start = 8 + header_len;
    if data_start > file_len {
        return Err(Error::safetensors(
            path,
            format!(
                "header of {header_len} bytes runs past the end of the {file_len}-byte file (truncated?)"
            ),
        ));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| Error::io(path, e))?;
    parse_header(&header, file_len - data_start)
        .map(|entries| {
            entries
                .into_iter()
                .map(|e| TensorInfo {
                    class: TensorClass::of_name(&e.name),
                    layer: layer_of_name(&e.name),
                    file: path.to_path_buf(),
                    file_offset_bytes: data_start + e.begin,
                    bytes: e.end - e.begin,
                    format: e.format.or(WeightFormat::from_dtype(e.dtype)),
                    shape: e.value_shape(),
                    name: e.name,
                    dtype: e.dtype,
                })
                .collect()
        })
        .map_err(|m| Error::safetensors(path, m))
}

/// Parses a whole safetensors file held in memory (8-byte little-endian header length, the
/// header, the data section) with the same checks as [`read_header`]. Entries' offsets are
/// relative to the data section. Never panics, whatever the bytes (fuzzed: fuzz/).
pub fn parse_file(bytes: &[u8]) -> std::result::Result<Vec<HeaderEntry>, String> {
    let file_len = bytes.len() as u64;
    let len_buf: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("file is {file_len} bytes, too short for a header"))?;
    let header_len = u64::from_le_bytes(len_buf);
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "header length {header_len} exceeds the 100 MiB limit"
        ));
    }
    let data_start = 8 + header_len;
    let header = bytes.get(8..data_start as usize).ok_or_else(|| {
        format!(
            "header of {header_len} bytes runs past the end of the {file_len}-byte file (truncated?)"
        )
    })?;
    parse_header(header, file_len - data_start)
}

/// One checked header entry; offsets are relative to the data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions as stored (for a block-quantized matrix, `[rows..., row_bytes]` of `U8`).
    pub shape: Vec<u64>,
    /// The block format the header's metadata names for it (`None`: its dtype's values).
    pub format: Option<WeightFormat>,
    /// First byte in the data section.
    pub begin: u64,
    /// One past the last byte.
    pub end: u64,
}

impl HeaderEntry {
    /// The shape of the values: the stored shape, or for a block-quantized matrix its rows
    /// of `row_bytes / block_bytes * block_elems` values.
    pub fn value_shape(&self) -> Vec<u64> {
        let mut shape = self.shape.clone();
        if let (Some(f), Some(last)) = (self.format, shape.last_mut()) {
            *last = *last / f.block_bytes() * f.block_elems();
        }
        shape
    }
}

/// The block formats a header's `__metadata__` names, by tensor name.
fn metadata_formats(
    obj: &serde_json::Map<String, serde_json::Value>,
) -> std::result::Result<BTreeMap<String, WeightFormat>, String> {
    let Some(meta) = obj.get("__metadata__") else {
        return Ok(BTreeMap::new());
    };
    let meta = meta
        .as_object()
        .ok_or("__metadata__ is not a JSON object")?;
    let mut formats = BTreeMap::new();
    for (key, value) in meta {
        let Some(name) = key.strip_prefix(FORMAT_KEY_PREFIX) else {
            continue;
        };
        let text = value
            .as_str()
            .ok_or_else(|| format!("{key}: the format is not a string"))?;
        let format: WeightFormat = text.parse().map_err(|e| format!("{key}: {e}"))?;
        if format.is_plain() {
            return Err(format!(
                "{key}: {format} is stored by its own dtype, not named in the metadata"
            ));
        }
        if !obj.contains_key(name) {
            return Err(format!("{key}: no tensor {name} in this file"));
        }
        formats.insert(name.to_string(), format);
    }
    Ok(formats)
}

/// Checks that a tensor the metadata says holds `format` blocks is stored as such: `U8`
/// rows of whole blocks.
fn check_block_tensor(
    name: &str,
    dtype: Dtype,
    shape: &[u64],
    format: WeightFormat,
) -> std::result::Result<(), String> {
    let row_bytes = match shape {
        [_, .., row_bytes] if dtype == Dtype::U8 => *row_bytes,
        _ => {
            return Err(format!(
                "{name}: {format} blocks are stored as U8 of [rows..., row_bytes], not {dtype} {shape:?}"
            ));
        }
    };
    if row_bytes == 0 || !row_bytes.is_multiple_of(format.block_bytes()) {
        return Err(format!(
            "{name}: rows of {row_bytes} bytes are not whole {format} blocks of {} bytes",
            format.block_bytes()
        ));
    }
    Ok(())
}

/// Parses and checks a header's JSON against a data section of `data_len` bytes. Entries
/// come back sorted by offset. Never panics, whatever the bytes.
pub fn parse_header(header: &[u8], data_len: u64) -> std::result::Result<Vec<HeaderEntry>, String> {
    let text = std::str::from_utf8(header).map_err(|_| "header is not UTF-8".to_string())?;
    let value: serde_json::Value = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| format!("header is not JSON: {e}"))?;
    let obj = value.as_object().ok_or("header is not a JSON object")?;
    let formats = metadata_formats(obj)?;
    let mut entries = Vec::with_capacity(obj.len());
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let o = v
            .as_object()
            .ok_or_else(|| format!("{name}: entry is not an object"))?;
        let dtype_name = o
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| format!("{name}: missing dtype"))?;
        let dtype = Dtype::from_safetensors_name(dtype_name)
            .ok_or_else(|| format!("{name}: unsupported dtype {dtype_name}"))?;
        let shape: Vec<u64> = o
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| format!("{name}: missing shape"))?
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| format!("{name}: shape holds a non-integer"))
            })
            .collect::<std::result::Result<_, _>>()?;
        let offsets = o
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .ok_or_else(|| format!("{name}: missing data_offsets"))?;
        let (begin, end) = match offsets.as_slice() {
            [b, e] => (
                b.as_u64()
                    .ok_or_else(|| format!("{name}: bad data_offsets"))?,
                e.as_u64()
                    .ok_or_else(|| format!("{name}: bad data_offsets"))?,
            ),
            _ => return Err(format!("{name}: data_offsets must hold two integers")),
        };
        if begin > end || end > data_len {
            return Err(format!(
                "{name}: data_offsets [{begin}, {end}] outside the {data_len}-byte data section"
            ));
        }
        let expected = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(dtype.size_bytes()))
            .ok_or_else(|| format!("{name}: shape {shape:?} overflows"))?;
        if expected != end - begin {
            return Err(format!(
                "{name}: shape {shape:?} x {dtype} is {expected} bytes but data_offsets span {}",
                end - begin
            ));
        }
        let format = formats.get(name).copied();
        if let Some(f) = format {
            check_block_tensor(name, dtype, &shape, f)?;
        }
        entries.push(HeaderEntry {
            name: name.clone(),
            dtype,
            shape,
            format,
            begin,
            end,
        });
    }
    entries.sort_by_key(|e| (e.begin, e.end));
    for w in entries.windows(2) {
        if w[1].begin < w[0].end {
            return Err(format!("tensors {} and {} overlap", w[0].name, w[1].name));
        }
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(json: &str) -> Vec<u8> {
        json.as_bytes().to_vec()
    }

    #[test]
    fn parses_a_valid_header() {
        let h = header(
            r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2,3],"data_offsets":[12,24]},"a":{"dtype":"F32","shape":[3],"data_offsets":[0,12]}}"#,
        );
        let e = parse_header(&h, 24).unwrap();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].name, "a");
        assert_eq!(e[1].shape, vec![2, 3]);
    }

    #[test]
    fn a_block_format_named_in_the_metadata_gives_the_matrix_shape() {
        // Two rows of 64 q8_0 values: 2 blocks of 34 bytes each.
        let h = header(
            r#"{"__metadata__":{"format":"pt","vlmem.format.w":"q8_0"},"w":{"dtype":"U8","shape":[2,68],"data_offsets":[0,136]},"n":{"dtype":"F32","shape":[64],"data_offsets":[136,392]}}"#,
        );
        let e = parse_header(&h, 392).unwrap();
        assert_eq!(e[0].name, "w");
        assert_eq!(e[0].format, Some(WeightFormat::Q8_0));
        assert_eq!(e[0].shape, vec![2, 68]);
        assert_eq!(e[0].value_shape(), vec![2, 64]);
        assert_eq!(e[1].format, None);
        assert_eq!(e[1].value_shape(), vec![64]);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.safetensors");
        let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&h);
        bytes.resize(bytes.len() + 392, 0);
        std::fs::write(&path, bytes).unwrap();
        let infos = read_header(&path).unwrap();
        assert_eq!(infos[0].shape, vec![2, 64]);
        assert_eq!(infos[0].format, Some(WeightFormat::Q8_0));
        assert_eq!(infos[0].dtype, Dtype::U8);
        assert_eq!(infos[0].bytes, 136);
        assert_eq!(infos[1].format, Some(WeightFormat::F32));
    }

    #[test]
    fn rejects_bad_block_format_metadata() {
        let cases = [
            (
                r#"{"__metadata__":{"vlmem.format.w":"q9"},"w":{"dtype":"U8","shape":[2,68],"data_offsets":[0,136]}}"#,
                "unknown weight format",
            ),
            (
                r#"{"__metadata__":{"vlmem.format.w":"bf16"},"w":{"dtype":"U8","shape":[2,68],"data_offsets":[0,136]}}"#,
                "its own dtype",
            ),
            (
                r#"{"__metadata__":{"vlmem.format.x":"q8_0"},"w":{"dtype":"U8","shape":[2,68],"data_offsets":[0,136]}}"#,
                "no tensor x",
            ),
            (
                r#"{"__metadata__":{"vlmem.format.w":"q8_0"},"w":{"dtype":"U8","shape":[2,67],"data_offsets":[0,134]}}"#,
                "not whole q8_0 blocks",
            ),
            (
                r#"{"__metadata__":{"vlmem.format.w":"q8_0"},"w":{"dtype":"U8","shape":[136],"data_offsets":[0,136]}}"#,
                "stored as U8 of [rows..., row_bytes]",
            ),
            (
                r#"{"__metadata__":{"vlmem.format.w":"q8_0"},"w":{"dtype":"I8","shape":[2,68],"data_offsets":[0,136]}}"#,
                "stored as U8",
            ),
            (
                r#"{"__metadata__":{"vlmem.format.w":7},"w":{"dtype":"U8","shape":[2,68],"data_offsets":[0,136]}}"#,
                "not a string",
            ),
            (r#"{"__metadata__":[1]}"#, "__metadata__ is not"),
        ];
        for (json, needle) in cases {
            let err = parse_header(json.as_bytes(), 136).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn rejects_malformed_headers() {
        let cases = [
            (r#"not json"#, "not JSON"),
            (r#"[1,2]"#, "not a JSON object"),
            (
                r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#,
                "unsupported dtype",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#,
                "is 8 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,400]}}"#,
                "outside",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                "outside",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}"#,
                "non-integer",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1]}}"#,
                "missing data_offsets",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                "overlap",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,4]}}"#,
                "overflows",
            ),
        ];
        for (json, needle) in cases {
            let err = parse_header(json.as_bytes(), 16).unwrap_err();
            assert!(err.contains(needle), "{json}: {err}");
        }
    }

    #[test]
    fn rejects_truncated_and_garbled_files() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, [1u8, 2, 3]).unwrap();
        assert!(matches!(
            read_header(&short),
            Err(Error::Safetensors { .. })
        ));
        let huge = dir.path().join("huge.safetensors");
        std::fs::write(&huge, u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(read_header(&huge), Err(Error::Safetensors { .. })));
        let past_end = dir.path().join("past.safetensors");
        let mut bytes = 1000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(&past_end, bytes).unwrap();
        let err = read_header(&past_end).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), data_len in any::<u64>()) {
            let _ = parse_header(&bytes, data_len);
        }
    }
}
