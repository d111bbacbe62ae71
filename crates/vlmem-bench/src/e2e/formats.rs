//! The weight formats side by side, every weight resident: the synthesized checkpoint in
//! bf16 and its quantized copies (q8_0, q4_k: written once into the cache folder by the same
//! code `--quant` uses, [`quantized_copy`], then loaded in place like any checkpoint), each
//! timed on decode and on one prompt pass, and one image request's time to the first token.
//!
//! Figures (the names the llama.cpp comparison sets against its own, [`super::peers`]):
//! - `decode_tok_s.{bf16,q8_0,q4_k}`: greedy decode after a short prompt;
//! - `prefill_tok_s.{bf16,q8_0,q4_k}`: a prompt of [`PREFILL_TOKENS`] ids (128 in the quick
//!   setting) over its time to the first token, the best of [`PREFILL_REPS`];
//! - `ttft_s.image_{side}`: one `side x side` image (1024, 256 in the quick setting) and a
//!   short question, q8_0 weights: the request's preparation (preprocessing the image) plus
//!   its time to the first token (the vision tower, the prompt pass, the first choice).

use super::decode::{decode_run, engine_with_host_weights};
use super::{MIB, Setup, push};
use crate::SuiteReport;
use std::path::Path;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_qwen3vl::format::WeightFormat;
use vlmem_qwen3vl::quantize::quantized_copy;
use vlmem_runner::preprocess::preprocess;
use vlmem_runner::{PreprocessConfig, Request, RequestImage, SamplingParams};

/// Prompt ids of the timed prompt pass (the llama.cpp peer's prompt length).
pub(super) const PREFILL_TOKENS: usize = 512;
/// Prompt passes timed per format; the fastest counts (the first also faults the weights'
/// pages of a fresh engine in).
const PREFILL_REPS: usize = 2;

/// The formats timed, by figure label.
const FORMATS: [(&str, Option<WeightFormat>); 3] = [
    ("bf16", None),
    ("q8_0", Some(WeightFormat::Q8_0)),
    ("q4_k", Some(WeightFormat::Q4_K)),
];

/// The format the image request runs in.
const IMAGE_FORMAT: &str = "q8_0";

/// Every format's figures into `report` (a note for each case that failed); the quantized
/// copies are kept under `cache` ([`quantized_copy`]).
pub(super) fn run_formats(report: &mut SuiteReport, ckpt: &Checkpoint, s: &Setup, cache: &Path) {
    let (prompt_tokens, image_side) = if s.quick {
        (128, 256)
    } else {
        (PREFILL_TOKENS, 1024)
    };
    for (label, format) in FORMATS {
        let held = match format {
            None => ckpt.clone(),
            Some(f) => match quantized_copy(ckpt, f, cache, true) {
                Ok(copy) => {
                    if copy.written {
                        report.notes.push(format!(
                            "{label}: quantized copy written to {}",
                            copy.checkpoint.dir.display()
                        ));
                    }
                    copy.checkpoint
                }
                Err(e) => {
                    report
                        .notes
                        .push(format!("{label}: quantizing failed: {e}"));
                    continue;
                }
            },
        };
        let resident = held.total_bytes().div_ceil(MIB) * MIB;
        match decode_run(&held, resident, 2, s.new_tokens) {
            Ok(d) => push(report, &format!("decode_tok_s.{label}"), d.tok_s, "tok/s"),
            Err(e) => report.notes.push(format!("decode {label} failed: {e}")),
        }
        match prefill_tok_s(&held, resident, prompt_tokens) {
            Ok(v) => push(report, &format!("prefill_tok_s.{label}"), v, "tok/s"),
            Err(e) => report.notes.push(format!("prefill {label} failed: {e}")),
        }
        if label == IMAGE_FORMAT {
            match image_ttft_s(&held, resident, image_side) {
                Ok((secs, pads)) => {
                    push(report, &format!("ttft_s.image_{image_side}"), secs, "s");
                    report.notes.push(format!(
                        "image request: one {image_side}x{image_side} image ({pads} image tokens) and a short question, {label} weights, all resident"
                    ));
                }
                Err(e) => report.notes.push(format!("image {label} failed: {e}")),
            }
        }
    }
    report.notes.push(format!(
        "formats: decode after a short prompt, prefill of {prompt_tokens} prompt ids (best of {PREFILL_REPS}), every weight resident"
    ));
}

/// `n` prompt ids spread over the vocabulary below its special tokens (no image pads).
fn spread_ids(c: &Checkpoint, n: usize) -> Vec<u32> {
    let cfg = &c.config;
    let below = cfg
        .image_token_id
        .min(cfg.vision_start_token_id)
        .min(c.config.text.vocab_size as u32)
        .max(2);
    let mut x = 0x9E37_79B9u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % below
        })
        .collect()
}

/// Prompt tokens per second of one prompt pass of `tokens` ids (the best of
/// [`PREFILL_REPS`] on one engine holding every weight).
fn prefill_tok_s(c: &Checkpoint, resident: u64, tokens: usize) -> Result<f64, String> {
    let request = Request::ids(spread_ids(c, tokens))
        .max_new_tokens(1)
        .sampling(SamplingParams::greedy());
    let (engine, request, _) = engine_with_host_weights(c, resident, 2, &request)?;
    let mut best = 0.0f64;
    for _ in 0..PREFILL_REPS {
        let reply = engine
            .generate(&request, &mut |_| {})
            .map_err(|e| e.to_string())?;
        let secs = reply.timings.time_to_first_token.as_secs_f64();
        if secs > 0.0 {
            best = best.max(tokens as f64 / secs);
        }
    }
    Ok(best)
}

/// A `side x side` test image: smooth gradients with a pattern, as a photo has structure.
fn test_image(side: u32) -> image::RgbImage {
    image::RgbImage::from_fn(side, side, |x, y| {
        let v = ((x ^ y) & 0x3f) as u8;
        image::Rgb([
            (x * 255 / side) as u8,
            (y * 255 / side) as u8,
            v.wrapping_mul(4),
        ])
    })
}

/// Seconds from submitting a request with one `side x side` image to its first token
/// (preparation included), on an engine holding every weight, and the image's tokens.
fn image_ttft_s(c: &Checkpoint, resident: u64, side: u32) -> Result<(f64, usize), String> {
    let cfg = &c.config;
    let image = test_image(side);
    let merge = cfg.vision.spatial_merge_size as usize;
    // The runner's preprocessing settings ([`PreprocessConfig::for_vision`]) give the
    // image's token count, which the prompt's pads must match.
    let pads = preprocess(&image, &PreprocessConfig::for_vision(&cfg.vision))
        .map_err(|e| e.to_string())?
        .num_tokens(merge);
    let mut ids = spread_ids(c, 4);
    ids.push(cfg.vision_start_token_id);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, pads));
    ids.push(cfg.vision_end_token_id);
    ids.extend(spread_ids(c, 12));
    let request = Request::ids(ids)
        .image(RequestImage::Rgb(image))
        .max_new_tokens(1)
        .sampling(SamplingParams::greedy());
    let (engine, request, _) = engine_with_host_weights(c, resident, 2, &request)?;
    let reply = engine
        .generate(&request, &mut |_| {})
        .map_err(|e| e.to_string())?;
    let t = &reply.timings;
    Ok(((t.prepare + t.time_to_first_token).as_secs_f64(), pads))
}

#[cfg(test)]
mod tests {
    use super::super::{ensure_checkpoint, setup};
    use super::*;
    use crate::BenchOptions;

    /// The quick setting, cut to two layers: every format's decode and prefill figure and the
    /// image request's time are reported and sane, no case failed, and the quantized copies
    /// are written once into the cache folder given and reused.
    #[test]
    fn formats_report_every_figure() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = setup(BenchOptions { quick: true }).unwrap();
        s.cfg.text.num_hidden_layers = 2;
        s.new_tokens = 3;
        let (c, _) = ensure_checkpoint(&tmp.path().join("ckpt"), &s.cfg).unwrap();
        let cache = tmp.path().join("cache");
        let mut report = SuiteReport {
            suite: "e2e".into(),
            results: Vec::new(),
            notes: Vec::new(),
        };
        run_formats(&mut report, &c, &s, &cache);
        let failed: Vec<_> = report
            .notes
            .iter()
            .filter(|n| n.contains("failed"))
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        for name in [
            "decode_tok_s.bf16",
            "decode_tok_s.q8_0",
            "decode_tok_s.q4_k",
            "prefill_tok_s.bf16",
            "prefill_tok_s.q8_0",
            "prefill_tok_s.q4_k",
            "ttft_s.image_256",
        ] {
            let r = report.results.iter().find(|r| r.name == name);
            let v = r.unwrap_or_else(|| panic!("{name} missing")).value;
            assert!(v.is_finite() && v > 0.0, "{name}: {v}");
        }
        let written = |r: &SuiteReport| {
            r.notes
                .iter()
                .filter(|n| n.contains("quantized copy written"))
                .count()
        };
        assert_eq!(written(&report), 2);
        assert_eq!(
            std::fs::read_dir(cache.join("quantized")).unwrap().count(),
            2
        );
        // A second run reuses both copies.
        report.notes.clear();
        report.results.clear();
        run_formats(&mut report, &c, &s, &cache);
        assert_eq!(written(&report), 0);
    }
}
