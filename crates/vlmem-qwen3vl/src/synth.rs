//! `vlmem synth`: writes a checkpoint folder with the real tensor names, shapes and dtype of a
//! catalog model (seeded random bf16 values), its config.json (released layout) and, when it
//! is large, shards with model.safetensors.index.json, so later work can stream real-sized
//! models without downloading any.
//!
//! Values: RMSNorm and LayerNorm weights are 1.0, biases 0, every other weight a random bf16
//! of magnitude 2^-8 to 2^-4 with a random sign, so a forward pass stays finite. The same
//! seed gives the same bytes.

use crate::catalog;
use crate::checkpoint::{ShardTensor, pt_metadata, write_sharded};
use crate::config::Qwen3VlConfig;
use crate::error::{Error, Result};
use crate::tensors::{Dtype, TensorSpec, expected_tensors};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

/// Shard size limit of the released checkpoints' writer (transformers: 5 GB).
pub const DEFAULT_SHARD_MAX_BYTES: u64 = 5_000_000_000;

/// How to synthesize.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Keep only the first N decoder layers (`None`: all).
    pub layers: Option<u64>,
    /// RNG seed.
    pub seed: u64,
    /// Largest shard; a model larger than this is sharded with an index.
    pub shard_max_bytes: u64,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            layers: None,
            seed: 0,
            shard_max_bytes: DEFAULT_SHARD_MAX_BYTES,
            progress: false,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct SynthReport {
    /// The folder.
    pub dir: PathBuf,
    /// The weight files.
    pub files: Vec<PathBuf>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub data_bytes: u64,
}

/// Synthesizes catalog model `name` into `out`.
pub fn synth(name: &str, out: &Path, opts: &SynthOptions) -> Result<SynthReport> {
    let cfg = catalog::config(name).ok_or_else(|| Error::UnknownModel(name.to_string()))?;
    synth_config(cfg, out, opts)
}

/// Synthesizes a checkpoint for any valid config (tests use tiny ones).
pub fn synth_config(
    mut cfg: Qwen3VlConfig,
    out: &Path,
    opts: &SynthOptions,
) -> Result<SynthReport> {
    if let Some(layers) = opts.layers {
        if layers == 0 || layers > cfg.text.num_hidden_layers {
            return Err(Error::BadRequest(format!(
                "--layers must be between 1 and {}",
                cfg.text.num_hidden_layers
            )));
        }
        cfg.text.num_hidden_layers = layers;
    }
    cfg.validate().map_err(|m| Error::config("<catalog>", m))?;
    if opts.shard_max_bytes == 0 {
        return Err(Error::BadRequest("shard size must be positive".into()));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tensors = expected_tensors(&cfg, Dtype::BF16);

    let data_bytes: u64 = tensors.iter().map(TensorSpec::bytes).sum();
    let bar = if opts.progress {
        let b = ProgressBar::new(data_bytes);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message("writing weights");
        b
    } else {
        ProgressBar::hidden()
    };

    // Shards in tensor order, each at most shard_max_bytes (a larger tensor gets its own).
    let headers: Vec<ShardTensor> = tensors
        .iter()
        .map(|t| ShardTensor::new(t.name.clone(), t.dtype, t.shape.clone()))
        .collect();
    let mut rng = SplitMix64(opts.seed ^ 0x005E_ED0F_71A4);
    let mut buf = vec![0u8; 4 << 20];
    let written = write_sharded(
        out,
        &headers,
        opts.shard_max_bytes,
        &pt_metadata(),
        |i, w| {
            let t = &tensors[i];
            let fill = fill_of(&t.name);
            let mut left = t.bytes();
            while left > 0 {
                let chunk = left.min(buf.len() as u64) as usize;
                fill_bf16(&mut buf[..chunk], fill, &mut rng);
                w.write(&buf[..chunk])?;
                bar.inc(chunk as u64);
                left -= chunk as u64;
            }
            Ok(())
        },
    )?;
    bar.finish_and_clear();
    write_json(&out.join("config.json"), &catalog::to_released_json(&cfg))?;
    Ok(SynthReport {
        dir: out.to_path_buf(),
        files: written.files,
        tensors: tensors.len(),
        data_bytes,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::BadRequest(format!("cannot encode JSON: {e}")))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

#[derive(Clone, Copy)]
enum Fill {
    Ones,
    Zeros,
    Random,
}

fn fill_of(name: &str) -> Fill {
    let is_norm = name.contains("norm");
    if name.ends_with(".bias") {
        Fill::Zeros
    } else if is_norm {
        Fill::Ones
    } else {
        Fill::Random
    }
}

/// Fills `buf` (an even number of bytes) with little-endian bf16 values.
fn fill_bf16(buf: &mut [u8], fill: Fill, rng: &mut SplitMix64) {
    match fill {
        Fill::Zeros => buf.fill(0),
        Fill::Ones => {
            let one = half::bf16::ONE.to_bits().to_le_bytes();
            for pair in buf.chunks_exact_mut(2) {
                pair.copy_from_slice(&one);
            }
        }
        Fill::Random => {
            for quad in buf.chunks_mut(8) {
                let r = rng.next();
                for (j, pair) in quad.chunks_exact_mut(2).enumerate() {
                    let bits = (r >> (16 * j)) as u16;
                    // sign | exponent 119..=122 (2^-8 .. 2^-5, times a mantissa in [1, 2)) | mantissa
                    let sign = bits & 0x8000;
                    let exponent = 119 + ((bits >> 7) & 0x3);
                    let value = sign | (exponent << 7) | (bits & 0x7f);
                    pair.copy_from_slice(&value.to_le_bytes());
                }
            }
        }
    }
}

/// SplitMix64: small, fast, and the same on every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_values_are_finite_small_and_seeded() {
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        fill_bf16(&mut a, Fill::Random, &mut SplitMix64(1));
        fill_bf16(&mut b, Fill::Random, &mut SplitMix64(1));
        assert_eq!(a, b);
        let mut c = vec![0u8; 4096];
        fill_bf16(&mut c, Fill::Random, &mut SplitMix64(2));
        assert_ne!(a, c);
        for pair in a.chunks_exact(2) {
            let v = half::bf16::from_bits(u16::from_le_bytes([pair[0], pair[1]])).to_f32();
            assert!(
                v.is_finite() && v.abs() >= 1.0 / 256.0 && v.abs() < 1.0 / 16.0,
                "{v}"
            );
        }
        assert!(matches!(
            fill_of("model.visual.blocks.0.norm1.weight"),
            Fill::Ones
        ));
        assert!(matches!(
            fill_of("model.visual.blocks.0.norm1.bias"),
            Fill::Zeros
        ));
        assert!(matches!(
            fill_of("model.language_model.layers.0.self_attn.q_norm.weight"),
            Fill::Ones
        ));
        assert!(matches!(fill_of("lm_head.weight"), Fill::Random));
    }
}
