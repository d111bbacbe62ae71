//! The prompt's forward pass tells its progress callback each vision block per image, then
//! each decoder layer, once per prompt; decode steps tell it nothing.

mod common;
use common::{fixture_dir, ids as ids_of, reference};

use std::sync::{Arc, Mutex};
use vlmem_runner::{GenerateOptions, PrefillProgress, Runner};

#[test]
fn prefill_reports_each_vision_block_then_each_layer() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let r = reference(&dir);
    let runner = Runner::open(&dir).unwrap();
    let cfg = runner.model().config().clone();
    let (depth, layers) = (
        cfg.vision.depth as usize,
        cfg.text.num_hidden_layers as usize,
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    assert!(
        runner
            .model()
            .on_prefill_progress(Arc::new(move |p| sink.lock().unwrap().push(p)))
    );
    // Set once.
    assert!(!runner.model().on_prefill_progress(Arc::new(|_| {})));

    let ids = ids_of(&r["input_ids"]);
    let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let out = runner
        .model()
        .generate(
            &ids,
            &images,
            &GenerateOptions {
                max_new_tokens: 4,
                stop_ids: Vec::new(),
                ..Default::default()
            },
            &mut |_| {},
        )
        .unwrap();
    assert_eq!(out.generated_ids.len(), 4);

    let mut want: Vec<PrefillProgress> = (1..=depth)
        .map(|done| PrefillProgress::Vision {
            image: 0,
            images: 1,
            done,
            total: depth,
        })
        .collect();
    want.extend((1..=layers).map(|done| PrefillProgress::Prompt {
        tokens: ids.len(),
        done,
        total: layers,
    }));
    assert_eq!(*seen.lock().unwrap(), want);
}
