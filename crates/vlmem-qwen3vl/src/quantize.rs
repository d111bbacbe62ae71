//! `vlmem quantize`: writes a checkpoint folder whose weights are held in a block format
//! (q8_0, q4_k), which `run`, `chat`, `plan` and the engine load directly and register in
//! place like any checkpoint, with no quantization at start.
//!
//! Each tensor takes the format [`WeightTensor::held_format`] chooses for it (the same
//! choice `vlmem plan --dtype` sizes), so the plan of a quantized folder equals the plan of
//! its source asked for in that format, byte for byte. A quantized matrix is stored as a
//! `U8` tensor of shape `[rows..., row_bytes]`, its format named in the header's metadata
//! (see [`crate::checkpoint`]); every other tensor is copied as it is. The folder also gets
//! the source's other files (config.json, tokenizer, chat template, preprocessor config) and
//! `quantization.json`, a note of what was done.
//!
//! The folder is written under a temporary name beside `out` and renamed into place when
//! complete, so an interrupted run (a full disk, Ctrl-C) never leaves a folder that looks
//! finished. Values are read row by row in chunks of at most [`CHUNK_BYTES`], so memory
//! stays small whatever the tensor.

use crate::checkpoint::{
    Checkpoint, ShardTensor, ShardWriter, TensorInfo, pt_metadata, write_sharded,
};
use crate::error::{Error, Result};
use crate::format::{WeightFormat, fp8};
use crate::math::WeightTensor;
use crate::tensors::Dtype;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Source bytes read (and converted) at a time, in whole rows.
pub const CHUNK_BYTES: u64 = 8 << 20;

/// Largest shard written; a larger model gets shards and model.safetensors.index.json.
pub const SHARD_MAX_BYTES: u64 = 4 << 30;

/// The note written beside the weights.
pub const NOTE_FILE: &str = "quantization.json";

/// How to quantize.
#[derive(Debug, Clone)]
pub struct QuantizeOptions {
    /// The block format asked for (`q8_0`, `q4_k`).
    pub format: WeightFormat,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Largest shard.
    pub shard_max_bytes: u64,
}

impl QuantizeOptions {
    /// Quantize to `format`, no progress bar, shards up to [`SHARD_MAX_BYTES`].
    pub fn new(format: WeightFormat) -> Self {
        QuantizeOptions {
            format,
            progress: false,
            shard_max_bytes: SHARD_MAX_BYTES,
        }
    }
}

/// What was written (also the content of `quantization.json`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuantizeReport {
    /// The format asked for.
    pub format: WeightFormat,
    /// The folder written.
    pub dir: PathBuf,
    /// The folder read.
    pub source: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Tensors in each format as written (by format name; stored types included).
    pub tensors_by_format: BTreeMap<String, usize>,
    /// Weight bytes read.
    pub source_bytes: u64,
    /// Weight bytes written.
    pub written_bytes: u64,
    /// The program that wrote it.
    pub written_by: String,
}

/// One tensor as it will be written.
#[derive(Debug, Clone)]
struct OutTensor<'a> {
    info: &'a TensorInfo,
    /// For an FP8 weight, its scale tensor.
    fp8_scales: Option<&'a TensorInfo>,
    /// `Some(format)` when converted to that format; `None`: copied as stored.
    convert: Option<WeightFormat>,
    /// The safetensors dtype and shape written.
    dtype: Dtype,
    shape: Vec<u64>,
}

impl<'a> OutTensor<'a> {
    fn of(src: &'a Checkpoint, info: &'a TensorInfo, format: WeightFormat) -> Result<Self> {
        let fp8_scales = match info.dtype {
            Dtype::F8E4M3 => Some(fp8_scales_of(src, info)?),
            _ => None,
        };
        let held = WeightTensor::from(info).held_format(Some(format));
        match held {
            Some(f) if Some(f) != info.format => {
                let (&cols, outer) = info
                    .shape
                    .split_last()
                    .ok_or_else(|| Error::BadRequest(format!("{}: a scalar", info.name)))?;
                let bad = |e: crate::format::FormatError| {
                    Error::BadRequest(format!("{}: {e}", info.name))
                };
                let row_bytes = f.row_bytes(cols).map_err(bad)?;
                let mut shape = outer.to_vec();
                shape.push(row_bytes);
                let (dtype, shape) = match f.plain_dtype() {
                    Some(d) => (d, info.shape.clone()),
                    None => (Dtype::U8, shape),
                };
                Ok(OutTensor {
                    info,
                    fp8_scales,
                    convert: Some(f),
                    dtype,
                    shape,
                })
            }
            _ => Ok(OutTensor {
                info,
                fp8_scales,
                convert: None,
                dtype: info.dtype,
                shape: stored_shape(info),
            }),
        }
    }
}

/// The shape a tensor is stored with (a block-quantized one's `[rows..., row_bytes]`).
fn stored_shape(info: &TensorInfo) -> Vec<u64> {
    let mut shape = info.shape.clone();
    if let (Some(f), Some(last)) = (info.format.filter(|f| !f.is_plain()), shape.last_mut()) {
        *last = *last / f.block_elems() * f.block_bytes();
    }
    shape
}

/// Writes `src` with its weights in `opts.format` to the new folder `out`.
pub fn quantize_checkpoint(
    src: &Checkpoint,
    out: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeReport> {
    let format = opts.format;
    if format.is_plain() {
        return Err(Error::BadRequest(format!(
            "{format} is not a block format: quantize to one of {}",
            block_format_names()
        )));
    }
    if let Some(t) = src
        .tensors
        .iter()
        .find(|t| t.format.is_some_and(|f| !f.is_plain()))
    {
        return Err(Error::BadRequest(format!(
            "{}: already quantized ({} holds {}); quantize its source checkpoint instead",
            src.dir.display(),
            t.name,
            t.format.map_or("?", WeightFormat::name)
        )));
    }
    if out.exists() {
        return Err(Error::BadRequest(format!(
            "{}: already exists; give a new folder",
            out.display()
        )));
    }
    // FP8 scales are folded into their weights' blocks, not written.
    let fp8 = fp8_weights(src);
    let tensors = src
        .tensors
        .iter()
        .filter(|t| fp8::weight_of_scale(&t.name).is_none_or(|w| !fp8.contains(w)))
        .map(|t| OutTensor::of(src, t, format))
        .collect::<Result<Vec<_>>>()?;

    let partial = partial_dir(out);
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    let written = write_folder(src, &tensors, &partial, opts);
    let report = match written {
        Ok(written_bytes) => {
            let mut tensors_by_format = BTreeMap::new();
            for t in &tensors {
                let name = t
                    .convert
                    .or(t.info.format)
                    .map_or(t.dtype.safetensors_name(), WeightFormat::name);
                *tensors_by_format.entry(name.to_string()).or_insert(0) += 1;
            }
            QuantizeReport {
                format,
                dir: out.to_path_buf(),
                source: src.dir.clone(),
                tensors: tensors.len(),
                tensors_by_format,
                source_bytes: src.total_bytes(),
                written_bytes,
                written_by: concat!("vlmem ", env!("CARGO_PKG_VERSION")).to_string(),
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(e);
        }
    };
    let finish = || -> Result<()> {
        let note = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::BadRequest(format!("cannot encode {NOTE_FILE}: {e}")))?;
        let note_path = partial.join(NOTE_FILE);
        std::fs::write(&note_path, note).map_err(|e| Error::io(&note_path, e))?;
        std::fs::rename(&partial, out).map_err(|e| {
            if out.exists() {
                Error::BadRequest(format!(
                    "{}: written by another process meanwhile; this copy was dropped",
                    out.display()
                ))
            } else {
                Error::io(out, e)
            }
        })
    };
    finish().inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&partial);
    })?;
    Ok(report)
}

/// The block formats, for messages.
fn block_format_names() -> String {
    WeightFormat::ALL
        .iter()
        .filter(|f| !f.is_plain())
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a folder is written before it is renamed to `out`.
fn partial_dir(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "quantized".into());
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes the shards, their index, and copies the source's other files; returns the weight
/// bytes written.
fn write_folder(
    src: &Checkpoint,
    tensors: &[OutTensor<'_>],
    dir: &Path,
    opts: &QuantizeOptions,
) -> Result<u64> {
    let headers: Vec<ShardTensor> = tensors
        .iter()
        .map(|t| ShardTensor {
            block_format: t.convert.or(t.info.format).filter(|f| !f.is_plain()),
            ..ShardTensor::new(t.info.name.clone(), t.dtype, t.shape.clone())
        })
        .collect();
    let bar = progress_bar(opts.progress, src.total_bytes(), opts.format);
    let written = write_sharded(
        dir,
        &headers,
        opts.shard_max_bytes,
        &pt_metadata(),
        |i, w| write_tensor(&tensors[i], w, &bar),
    )?;
    bar.finish_and_clear();
    copy_other_files(&src.dir, dir)?;
    Ok(written.data_bytes)
}

fn progress_bar(show: bool, total_bytes: u64, format: WeightFormat) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(total_bytes);
    b.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    b.set_message(format!("quantizing to {format}"));
    b
}

/// Streams one tensor from its source file into `w`, converted or copied.
fn write_tensor(t: &OutTensor<'_>, w: &mut ShardWriter, bar: &ProgressBar) -> Result<()> {
    let info = t.info;
    let src_io = |e| Error::io(&info.file, e);
    let mut file = File::open(&info.file).map_err(src_io)?;
    file.seek(SeekFrom::Start(info.file_offset_bytes))
        .map_err(src_io)?;
    let mut file = file.take(info.bytes);
    let Some(format) = t.convert else {
        let copied = w.copy_from(&mut file)?;
        if copied != info.bytes {
            return Err(truncated(info, copied));
        }
        bar.inc(copied);
        return Ok(());
    };
    let source = match t.fp8_scales {
        Some(scales) => RowSource::Fp8 {
            scales: read_scales(scales)?,
        },
        None => RowSource::Plain(info.format.filter(|f| f.is_plain()).ok_or_else(|| {
            Error::BadRequest(format!(
                "{}: {} values cannot be quantized",
                info.name, info.dtype
            ))
        })?),
    };
    let cols = *info.shape.last().unwrap_or(&1);
    let in_row_bytes = match source {
        RowSource::Plain(f) => f
            .row_bytes(cols)
            .map_err(|e| Error::BadRequest(format!("{}: {e}", info.name)))?,
        RowSource::Fp8 { .. } => cols,
    };
    let out_row_bytes = format
        .row_bytes(cols)
        .map_err(|e| Error::BadRequest(format!("{}: {e}", info.name)))?;
    let rows = info.bytes.checked_div(in_row_bytes).unwrap_or(0);
    let rows_per_chunk = (CHUNK_BYTES / in_row_bytes.max(1)).max(1);
    let cols = usize::try_from(cols).map_err(|_| too_big(info))?;
    let mut done = 0;
    while done < rows {
        let n = rows_per_chunk.min(rows - done);
        let in_len = usize::try_from(n * in_row_bytes).map_err(|_| too_big(info))?;
        let mut input = vec![0u8; in_len];
        file.read_exact(&mut input).map_err(src_io)?;
        let mut output = vec![0u8; usize::try_from(n * out_row_bytes).map_err(|_| too_big(info))?];
        convert_rows(
            &source,
            format,
            &input,
            &mut output,
            (in_row_bytes as usize, out_row_bytes as usize),
            (done as usize, cols),
        )
        .map_err(|e| match e {
            Error::BadRequest(m) => Error::BadRequest(format!("{}: {m}", info.name)),
            e => e,
        })?;
        w.write(&output)?;
        bar.inc(in_len as u64);
        done += n;
    }
    Ok(())
}

/// Converts whole rows `input` (`row_bytes.0` each, the first being row `first_row`) into
/// `output` (`row_bytes.1` each), the rows split across the machine's cores.
fn convert_rows(
    source: &RowSource,
    format: WeightFormat,
    input: &[u8],
    output: &mut [u8],
    (in_row_bytes, out_row_bytes): (usize, usize),
    (first_row, cols): (usize, usize),
) -> Result<()> {
    let rows = input.len() / in_row_bytes.max(1);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    let rows_per_thread = rows.div_ceil(threads.max(1)).max(1);
    let part = |input: &[u8], output: &mut [u8], first: usize| -> Result<()> {
        let mut values = vec![0f32; cols];
        for ((row_in, row_out), row) in input
            .chunks_exact(in_row_bytes)
            .zip(output.chunks_exact_mut(out_row_bytes))
            .zip(first..)
        {
            source.decode(row_in, row, &mut values)?;
            format
                .encode_row_into(&values, row_out)
                .map_err(|e| Error::BadRequest(e.to_string()))?;
        }
        Ok(())
    };
    if threads <= 1 {
        return part(input, output, first_row);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = input
            .chunks(rows_per_thread * in_row_bytes)
            .zip(output.chunks_mut(rows_per_thread * out_row_bytes))
            .enumerate()
            .map(|(i, (inp, out))| {
                let part = &part;
                scope.spawn(move || part(inp, out, first_row + i * rows_per_thread))
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::BadRequest("a quantizing thread panicked".into())))
        })
    })
}

/// Where a converted tensor's values come from.
enum RowSource {
    /// A plain format's little-endian values.
    Plain(WeightFormat),
    /// FP8 E4M3 bytes with the matrix's tile scales.
    Fp8 { scales: Vec<f32> },
}

impl RowSource {
    /// Row `row` of the source (`bytes`) into `out`'s values.
    fn decode(&self, bytes: &[u8], row: usize, out: &mut [f32]) -> Result<()> {
        match self {
            RowSource::Plain(f) => f
                .decode_row_into(bytes, out)
                .map_err(|e| Error::BadRequest(e.to_string())),
            RowSource::Fp8 { scales } => {
                fp8::decode_row_into(bytes, row, scales, out).map_err(Error::BadRequest)
            }
        }
    }
}

/// The names of a checkpoint's FP8 weights.
pub fn fp8_weights(ckpt: &Checkpoint) -> HashSet<&str> {
    ckpt.tensors
        .iter()
        .filter(|t| t.dtype == Dtype::F8E4M3)
        .map(|t| t.name.as_str())
        .collect()
}

/// The format the engine loads `ckpt` in when none is asked for: q8_0 for a checkpoint
/// holding FP8 weights (the kernels read q8_0's integer blocks as fast as any format, and
/// FP8 values with their tile scales transcode to it with one more rounding of at most
/// 1/254 of a block's largest value); `None` (as stored) otherwise.
pub fn load_format(ckpt: &Checkpoint) -> Option<WeightFormat> {
    ckpt.tensors
        .iter()
        .any(|t| t.dtype == Dtype::F8E4M3)
        .then_some(WeightFormat::Q8_0)
}

/// The scale tensor of FP8 weight `info`, checked: `[ceil(rows / 128), ceil(cols / 128)]`
/// of f32 or bf16.
fn fp8_scales_of<'a>(src: &'a Checkpoint, info: &TensorInfo) -> Result<&'a TensorInfo> {
    let name = fp8::scale_name(&info.name);
    let bad = |m: String| Error::safetensors(&info.file, format!("{}: {m}", info.name));
    let scales = src
        .tensor(&name)
        .ok_or_else(|| bad(format!("an FP8 weight without its scales {name}")))?;
    let [rows, cols] = info.shape[..] else {
        return Err(bad(format!(
            "FP8 weights must be matrices, not {:?}",
            info.shape
        )));
    };
    let want = fp8::scale_shape(rows, cols);
    if scales.shape != want || !matches!(scales.dtype, Dtype::F32 | Dtype::BF16) {
        return Err(bad(format!(
            "{name} is {} {:?}; FP8 tiles of 128 x 128 need f32 or bf16 {want:?}",
            scales.dtype, scales.shape
        )));
    }
    Ok(scales)
}

/// A scale tensor's values.
fn read_scales(info: &TensorInfo) -> Result<Vec<f32>> {
    let io = |e| Error::io(&info.file, e);
    let mut file = File::open(&info.file).map_err(io)?;
    file.seek(SeekFrom::Start(info.file_offset_bytes))
        .map_err(io)?;
    let mut bytes = vec![0u8; usize::try_from(info.bytes).map_err(|_| too_big(info))?];
    file.read_exact(&mut bytes).map_err(io)?;
    let format = info.format.unwrap_or(WeightFormat::F32);
    let mut out = vec![0f32; bytes.len() / format.block_bytes() as usize];
    format
        .decode_row_into(&bytes, &mut out)
        .map_err(|e| Error::safetensors(&info.file, format!("{}: {e}", info.name)))?;
    Ok(out)
}

fn truncated(info: &TensorInfo, copied: u64) -> Error {
    Error::safetensors(
        &info.file,
        format!(
            "{}: {copied} of {} bytes could be read (file truncated?)",
            info.name, info.bytes
        ),
    )
}

fn too_big(info: &TensorInfo) -> Error {
    Error::BadRequest(format!("{}: rows too large for this machine", info.name))
}

/// Copies the regular files of `src` that are not weights (config.json, the tokenizer, the
/// chat template, the preprocessor config, generation_config.json) into `dst`.
fn copy_other_files(src: &Path, dst: &Path) -> Result<()> {
    let entries = std::fs::read_dir(src).map_err(|e| Error::io(src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(src, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if is_weights || name == NOTE_FILE || !path.is_file() {
            continue;
        }
        let to = dst.join(&name);
        std::fs::copy(&path, &to).map_err(|e| Error::io(&to, e))?;
    }
    Ok(())
}

/// `$VLMEM_CACHE`, else `~/.cache/vlmem`, else the temp folder.
pub fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("VLMEM_CACHE") {
        return PathBuf::from(d);
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("vlmem"),
        None => std::env::temp_dir().join("vlmem-cache"),
    }
}

/// Where the copy of `src` in `format` is kept under `root`: named after the source folder,
/// the format and a fingerprint of the source's weight files (path, length, modification
/// time), so a checkpoint that changed is quantized again.
pub fn cache_dir_for(src: &Checkpoint, format: WeightFormat, root: &Path) -> Result<PathBuf> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let dir = src.dir.canonicalize().map_err(|e| Error::io(&src.dir, e))?;
    dir.hash(&mut h);
    for f in &src.files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        f.file_name().hash(&mut h);
        meta.len().hash(&mut h);
        if let Ok(t) = meta.modified()
            && let Ok(since) = t.duration_since(std::time::UNIX_EPOCH)
        {
            since.as_nanos().hash(&mut h);
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Ok(root
        .join("quantized")
        .join(format!("{name}-{}-{:016x}", format.name(), h.finish())))
}

/// `src` held in `format`: `src` itself when its weights are already in that format, else
/// its quantized copy under `root` ([`cache_dir_for`]), written now when there is none yet
/// (`written` in the answer says so). A folder already holding another block format is an
/// error.
pub fn quantized_copy(
    src: &Checkpoint,
    format: WeightFormat,
    root: &Path,
    progress: bool,
) -> Result<QuantizedCopy> {
    let held: Vec<WeightFormat> = src
        .tensors
        .iter()
        .filter_map(|t| t.format.filter(|f| !f.is_plain()))
        .collect();
    if !held.is_empty() {
        if held.contains(&format) {
            return Ok(QuantizedCopy {
                checkpoint: src.clone(),
                written: false,
            });
        }
        return Err(Error::BadRequest(format!(
            "{}: already quantized to {}; it cannot be quantized to {format}",
            src.dir.display(),
            held[0]
        )));
    }
    let dir = cache_dir_for(src, format, root)?;
    if dir.join(NOTE_FILE).is_file()
        && let Ok(ckpt) = Checkpoint::open(&dir)
    {
        return Ok(QuantizedCopy {
            checkpoint: ckpt,
            written: false,
        });
    }
    if dir.exists() {
        // A folder without its note was not finished by us: start over.
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    let opts = QuantizeOptions {
        progress,
        ..QuantizeOptions::new(format)
    };
    let written = match quantize_checkpoint(src, &dir, &opts) {
        Ok(_) => true,
        // Another process finished the same copy first: use it.
        Err(_) if dir.join(NOTE_FILE).is_file() => false,
        Err(e) => return Err(e),
    };
    Ok(QuantizedCopy {
        checkpoint: Checkpoint::open(&dir)?,
        written,
    })
}

/// A checkpoint held in the format asked for.
#[derive(Debug, Clone)]
pub struct QuantizedCopy {
    /// The folder to load.
    pub checkpoint: Checkpoint,
    /// Whether it was written by this call.
    pub written: bool,
}
