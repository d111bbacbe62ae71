//! Writes safetensors files, the other side of [`super::read_header`]: one writer for
//! `vlmem synth`, `vlmem quantize` and the fixture tools.
//!
//! A file is the header's length (8 bytes, little-endian), the header (compact JSON, its
//! keys sorted: each tensor's `data_offsets`, `dtype` and `shape`, and `__metadata__`
//! when there is any) padded with spaces to a multiple of 8 bytes so the data section
//! starts aligned, then the tensors' bytes back to back in the order given. A tensor held
//! in a block format is named in the metadata under [`FORMAT_KEY_PREFIX`] (see
//! [`super`]). Data is streamed: [`ShardWriter`] takes any number of writes of any size,
//! and checks that the tensors get exactly the bytes their header promises.
//!
//! [`write_sharded`] cuts a tensor list into shards of at most a given size (a larger
//! tensor alone), names them as transformers does (`model.safetensors`, or
//! `model-00001-of-00003.safetensors` and so on with `model.safetensors.index.json`), and
//! writes each through a [`ShardWriter`].

use super::{FORMAT_KEY_PREFIX, INDEX_FILE, SINGLE_FILE};
use crate::error::{Error, Result};
use crate::format::WeightFormat;
use crate::tensors::Dtype;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Bytes buffered between the caller's writes and the file.
const BUFFER_BYTES: usize = 8 << 20;

/// The metadata the released checkpoints' writer (transformers) puts in every file.
pub fn pt_metadata() -> BTreeMap<String, String> {
    BTreeMap::from([("format".to_string(), "pt".to_string())])
}

/// One tensor of a file, as its header describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardTensor {
    /// The tensor's name.
    pub name: String,
    /// Stored element type.
    pub dtype: Dtype,
    /// Dimensions as stored (a block-quantized matrix: `[rows..., row_bytes]` of `U8`).
    pub shape: Vec<u64>,
    /// The block format its bytes hold, named in the metadata; `None`: values of `dtype`.
    pub block_format: Option<WeightFormat>,
}

impl ShardTensor {
    /// A tensor of values of `dtype`.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<u64>) -> Self {
        ShardTensor {
            name: name.into(),
            dtype,
            shape,
            block_format: None,
        }
    }

    /// Data bytes: the shape's elements times the dtype's size, as readers check it.
    pub fn bytes(&self) -> Result<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::BadRequest(format!(
                    "{}: shape {:?} overflows 64 bits",
                    self.name, self.shape
                ))
            })
    }
}

/// A header value: a tensor's entry, or the metadata. Fields in sorted order, so the JSON
/// is the same whatever map type serde_json is built with.
#[derive(Serialize)]
#[serde(untagged)]
enum HeaderValue<'a> {
    Tensor {
        data_offsets: [u64; 2],
        dtype: &'static str,
        shape: &'a [u64],
    },
    Metadata(&'a BTreeMap<String, String>),
}

/// The header of a file holding `tensors` in order, padded to a multiple of 8 bytes, and
/// each tensor's end in the data section. `metadata` is written as `__metadata__` with each
/// block format's key added; no `__metadata__` when both are empty.
fn encode_header(
    tensors: &[ShardTensor],
    metadata: &BTreeMap<String, String>,
) -> Result<(Vec<u8>, Vec<u64>)> {
    let mut meta = metadata.clone();
    let mut header = BTreeMap::new();
    let mut ends = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(Error::BadRequest(
                "__metadata__ cannot name a tensor".into(),
            ));
        }
        let end = offset.checked_add(t.bytes()?).ok_or_else(|| {
            Error::BadRequest(format!("{}: the file passes 64 bits of bytes", t.name))
        })?;
        let entry = HeaderValue::Tensor {
            data_offsets: [offset, end],
            dtype: t.dtype.safetensors_name(),
            shape: &t.shape,
        };
        if header.insert(t.name.as_str(), entry).is_some() {
            return Err(Error::BadRequest(format!(
                "{}: two tensors of that name in one file",
                t.name
            )));
        }
        if let Some(f) = t.block_format.filter(|f| !f.is_plain()) {
            meta.insert(format!("{FORMAT_KEY_PREFIX}{}", t.name), f.name().into());
        }
        ends.push(end);
        offset = end;
    }
    if !meta.is_empty() {
        header.insert("__metadata__", HeaderValue::Metadata(&meta));
    }
    let mut bytes = serde_json::to_vec(&header)
        .map_err(|e| Error::BadRequest(format!("cannot encode header: {e}")))?;
    // Pad with spaces so the data section starts 8-byte aligned (as safetensors does).
    bytes.resize(bytes.len().next_multiple_of(8), b' ');
    Ok((bytes, ends))
}

/// Writes one safetensors file: [`ShardWriter::create`] writes the header, the writes that
/// follow stream the tensors' bytes in order, [`ShardWriter::finish`] flushes and syncs.
#[derive(Debug)]
pub struct ShardWriter {
    path: PathBuf,
    out: BufWriter<File>,
    /// Each tensor's name and end in the data section.
    tensors: Vec<(String, u64)>,
    /// Data bytes written so far.
    written: u64,
}

impl ShardWriter {
    /// Creates (or truncates) `path` and writes the header of `tensors` with `metadata`
    /// (see [`pt_metadata`]; block formats are added to it).
    pub fn create(
        path: &Path,
        tensors: &[ShardTensor],
        metadata: &BTreeMap<String, String>,
    ) -> Result<Self> {
        let (header, ends) = encode_header(tensors, metadata)?;
        let io = |e| Error::io(path, e);
        let file = File::create(path).map_err(io)?;
        let mut out = BufWriter::with_capacity(BUFFER_BYTES, file);
        out.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        out.write_all(&header).map_err(io)?;
        Ok(ShardWriter {
            path: path.to_path_buf(),
            out,
            tensors: tensors.iter().map(|t| t.name.clone()).zip(ends).collect(),
            written: 0,
        })
    }

    /// The file written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Data bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes of the whole data section.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.last().map_or(0, |t| t.1)
    }

    /// Appends `bytes` to the data section; an error past its end.
    pub fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let end = self.written.saturating_add(bytes.len() as u64);
        if end > self.data_bytes() {
            return Err(self.overrun(end));
        }
        self.out
            .write_all(bytes)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written = end;
        Ok(())
    }

    /// Appends what `from` gives, at most the rest of the data section, and returns the
    /// bytes copied. Errors reading `from` or writing are this file's.
    pub fn copy_from(&mut self, from: impl Read) -> Result<u64> {
        let rest = self.data_bytes() - self.written;
        let copied = std::io::copy(&mut from.take(rest), &mut self.out)
            .map_err(|e| Error::io(&self.path, e))?;
        self.written += copied;
        Ok(copied)
    }

    /// Errors unless the bytes written so far end tensor `index` exactly.
    fn check_tensor_end(&self, index: usize) -> Result<()> {
        match self.tensors.get(index) {
            Some((name, end)) if *end != self.written => Err(Error::BadRequest(format!(
                "{}: {name} ends at byte {end} of the data but {} bytes were written",
                self.path.display(),
                self.written
            ))),
            _ => Ok(()),
        }
    }

    fn overrun(&self, end: u64) -> Error {
        Error::BadRequest(format!(
            "{}: {end} bytes of data written where the header holds {}",
            self.path.display(),
            self.data_bytes()
        ))
    }

    /// Checks that every tensor got its bytes, flushes and syncs the file; returns the data
    /// bytes written.
    pub fn finish(mut self) -> Result<u64> {
        if self.written != self.data_bytes() {
            return Err(Error::BadRequest(format!(
                "{}: {} of the header's {} bytes of data written",
                self.path.display(),
                self.written,
                self.data_bytes()
            )));
        }
        let io = |e| Error::io(&self.path, e);
        self.out.flush().map_err(io)?;
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))?;
        Ok(self.written)
    }
}

/// The shards of tensors of `sizes` bytes in order: each at most `max_bytes`, a larger
/// tensor alone; always at least one (empty when there are no tensors).
pub fn shard_ranges(sizes: &[u64], max_bytes: u64) -> Vec<Range<usize>> {
    let mut shards = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if i > start && bytes.saturating_add(size) > max_bytes {
            shards.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(size);
    }
    if start < sizes.len() || shards.is_empty() {
        shards.push(start..sizes.len());
    }
    shards
}

/// The file name of shard `i` (from 0) of `n`: `model.safetensors` when `n` is 1, else
/// `model-{i + 1:05}-of-{n:05}.safetensors` as transformers names them.
pub fn shard_file_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_string()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Writes `model.safetensors.index.json` in `dir`: the data bytes of every shard and each
/// tensor's shard file name.
pub fn write_index(
    dir: &Path,
    total_size: u64,
    weight_map: &BTreeMap<String, String>,
) -> Result<()> {
    #[derive(Serialize)]
    struct IndexMetadata {
        total_size: u64,
    }
    #[derive(Serialize)]
    struct Index<'a> {
        metadata: IndexMetadata,
        weight_map: &'a BTreeMap<String, String>,
    }
    let index = Index {
        metadata: IndexMetadata { total_size },
        weight_map,
    };
    let path = dir.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index)
        .map_err(|e| Error::BadRequest(format!("cannot encode the index: {e}")))?;
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// What [`write_sharded`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenShards {
    /// The weight files, in order.
    pub files: Vec<PathBuf>,
    /// Data bytes of all of them.
    pub data_bytes: u64,
}

/// Writes `tensors` in order into the existing folder `dir`: `model.safetensors`, or when
/// they pass `max_shard_bytes` shards ([`shard_ranges`], [`shard_file_name`]) and
/// `model.safetensors.index.json` ([`write_index`]); a stale index of an earlier sharded
/// write is removed when one file is written, as it would shadow it. Each file's header
/// carries `metadata` (see [`ShardWriter::create`]). `fill(i, writer)` writes tensor `i`'s
/// bytes, in as many writes as it likes, exactly as many as the tensor's header promises.
pub fn write_sharded(
    dir: &Path,
    tensors: &[ShardTensor],
    max_shard_bytes: u64,
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut ShardWriter) -> Result<()>,
) -> Result<WrittenShards> {
    let sizes = tensors
        .iter()
        .map(ShardTensor::bytes)
        .collect::<Result<Vec<_>>>()?;
    let shards = shard_ranges(&sizes, max_shard_bytes);
    let n = shards.len();
    let mut files = Vec::with_capacity(n);
    let mut weight_map = BTreeMap::new();
    let mut data_bytes = 0u64;
    for (i, range) in shards.into_iter().enumerate() {
        let file_name = shard_file_name(i, n);
        let path = dir.join(&file_name);
        let mut w = ShardWriter::create(&path, &tensors[range.clone()], metadata)?;
        for (j, index) in range.enumerate() {
            fill(index, &mut w)?;
            w.check_tensor_end(j)?;
            weight_map.insert(tensors[index].name.clone(), file_name.clone());
        }
        data_bytes += w.finish()?;
        files.push(path);
    }
    let index = dir.join(INDEX_FILE);
    if n > 1 {
        write_index(dir, data_bytes, &weight_map)?;
    } else if index.exists() {
        std::fs::remove_file(&index).map_err(|e| Error::io(&index, e))?;
    }
    Ok(WrittenShards { files, data_bytes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{parse_file, read_header};

    #[test]
    fn shards_cut_before_the_tensor_that_passes_the_limit() {
        // No tensors: one empty shard.
        let none = shard_ranges(&[], 10);
        assert_eq!((none.len(), none[0].clone()), (1, 0..0));
        assert_eq!(shard_ranges(&[4, 4, 4], 10), [0..2, 2..3]);
        assert_eq!(shard_ranges(&[4, 20, 4], 10), [0..1, 1..2, 2..3]);
        assert_eq!(shard_ranges(&[5, 5, 5, 5], 10), [0..2, 2..4]);
        assert_eq!(shard_ranges(&[10, 1], 10), [0..1, 1..2]);
        let one = shard_ranges(&[7, 3], 10);
        assert_eq!((one.len(), one[0].clone()), (1, 0..2));
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(1, 12), "model-00002-of-00012.safetensors");
    }

    #[test]
    fn headers_are_sorted_padded_and_name_block_formats() {
        let tensors = [
            ShardTensor::new("b", Dtype::BF16, vec![2, 3]),
            ShardTensor {
                block_format: Some(WeightFormat::Q8_0),
                ..ShardTensor::new("a", Dtype::U8, vec![1, 34])
            },
        ];
        let (header, ends) = encode_header(&tensors, &pt_metadata()).unwrap();
        assert_eq!(ends, [12, 46]);
        assert_eq!(header.len() % 8, 0);
        let text = std::str::from_utf8(&header).unwrap();
        assert_eq!(
            text.trim_end_matches(' '),
            r#"{"__metadata__":{"format":"pt","vlmem.format.a":"q8_0"},"a":{"data_offsets":[12,46],"dtype":"U8","shape":[1,34]},"b":{"data_offsets":[0,12],"dtype":"BF16","shape":[2,3]}}"#
        );
        // No metadata at all: no __metadata__ key.
        let (header, _) = encode_header(&tensors[..1], &BTreeMap::new()).unwrap();
        assert!(!String::from_utf8(header).unwrap().contains("__metadata__"));
        let twice = [tensors[0].clone(), tensors[0].clone()];
        assert!(encode_header(&twice, &BTreeMap::new()).is_err());
    }

    #[test]
    fn a_written_file_reads_back_and_wrong_lengths_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        let tensors = [
            ShardTensor::new("x", Dtype::F32, vec![3]),
            ShardTensor::new("y", Dtype::BF16, vec![2]),
        ];
        let mut w = ShardWriter::create(&path, &tensors, &pt_metadata()).unwrap();
        w.write(&[1; 5]).unwrap();
        w.write(&[1; 7]).unwrap();
        // A reader gives at most the rest of the data section.
        assert_eq!(w.copy_from(&[2u8; 7][..]).unwrap(), 4);
        // The data section is full: more is refused.
        assert!(w.write(&[3]).is_err());
        assert_eq!(w.copy_from(&[3u8; 4][..]).unwrap(), 0);
        assert_eq!(w.finish().unwrap(), 16);
        let bytes = std::fs::read(&path).unwrap();
        let entries = parse_file(&bytes).unwrap();
        assert_eq!(entries.len(), 2);
        let infos = read_header(&path).unwrap();
        let y = infos.iter().find(|t| t.name == "y").unwrap();
        let at = y.file_offset_bytes as usize;
        assert_eq!(&bytes[at..at + 4], &[2; 4]);
        assert_eq!(bytes.len(), at + 4);

        let short = ShardWriter::create(&path, &tensors, &pt_metadata()).unwrap();
        assert!(short.finish().is_err());
        // A fill that writes the wrong bytes for its tensor is caught at the tensor.
        let wrong = write_sharded(dir.path(), &tensors, u64::MAX, &pt_metadata(), |_, w| {
            w.write(&[0; 6])
        });
        assert!(wrong.unwrap_err().to_string().contains("x ends at byte 12"));
    }
}
