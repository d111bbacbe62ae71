//! Helpers the runner's test files share: where the bundled fixtures are, their reference
//! outputs, and comparisons.
#![allow(dead_code)] // each test file uses its own subset

use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The four bundled fixtures: dense and MoE, each in both config layouts.
pub const FIXTURES: [&str; 4] = [
    "qwen3-vl-tiny",
    "qwen3-vl-tiny-released-layout",
    "qwen3-vl-moe-tiny",
    "qwen3-vl-moe-tiny-released-layout",
];

/// The folder of fixture `name` (fixtures/ at the repository root).
pub fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// The reference implementation's outputs in `dir`/reference.safetensors.
pub fn reference(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors loads")
}

/// An integer tensor's values as token ids.
pub fn ids(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| u32::try_from(x).expect("id fits u32"))
        .collect()
}

/// A float tensor's values, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Max |a - b|; the lengths must agree.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `request` prepared by `engine` ([`vlmem_runner::Engine::prepare`]): its prompt ids and
/// preprocessed images.
pub fn prepared(
    engine: &vlmem_runner::Engine,
    request: &vlmem_runner::Request,
) -> (Vec<u32>, Vec<vlmem_runner::ImageInput>) {
    let p = engine.prepare(request).unwrap();
    let images = p
        .images
        .iter()
        .map(|i| match i {
            vlmem_runner::RequestImage::Preprocessed(x) => x.clone(),
            other => panic!("not preprocessed: {other:?}"),
        })
        .collect();
    let ids = match &p.prompt {
        vlmem_runner::Prompt::Ids(ids) => ids.clone(),
        other => panic!("not ids: {other:?}"),
    };
    (ids, images)
}
