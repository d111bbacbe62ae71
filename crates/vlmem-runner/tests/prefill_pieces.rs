//! A prompt processed in pieces (as the scheduler runs long prompts, a piece per step, and
//! after a prefix taken from the KV pool) gives the logits of the prompt processed whole:
//! on every fixture, the reference prompt with its image cut every few tokens, pieces
//! starting and ending inside the image's pads included, within 1e-4.

mod common;
use common::{FIXTURES, fixture_dir, ids as ids_of, max_abs};

use vlmem_runner::kv::KvDtype;
use vlmem_runner::rope::MropePositions;
use vlmem_runner::{Engine, ImageInput, KvCache, PrefillOptions, Request, RequestImage};

/// The reference prompt's ids and its preprocessed image.
fn prompt(engine: &Engine, fixture: &str) -> (Vec<u32>, Vec<ImageInput>) {
    let dir = fixture_dir(fixture);
    let r = Request::ids(ids_of(&common::reference(&dir)["input_ids"]))
        .image(RequestImage::Path(dir.join("image0.png")));
    common::prepared(engine, &r)
}

fn last_logits(pre: vlmem_runner::model::Prefill) -> Vec<f32> {
    pre.logits
        .expect("logits")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn a_prompt_in_pieces_equals_the_prompt_whole() {
    for fixture in FIXTURES {
        let engine = Engine::builder(fixture_dir(fixture))
            .kv_dtype(KvDtype::F32)
            .build()
            .unwrap();
        let model = engine.runner().model();
        let layers = model.config().text.num_hidden_layers as usize;
        let (ids, images) = prompt(&engine, fixture);
        let pad = model.config().image_token_id;
        let pads: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == pad).collect();
        let (first_pad, end_pad) = (pads[0], pads[pads.len() - 1] + 1);
        assert_eq!(
            end_pad - first_pad,
            pads.len(),
            "{fixture}: one run of pads"
        );

        let mut kv = KvCache::with_dtype(layers, KvDtype::F32);
        let whole = last_logits(
            model
                .prefill(&ids, &images, &mut kv, PrefillOptions::default())
                .unwrap(),
        );

        let positions = model.positions(&ids, &images).unwrap();
        // Pieces of 7 tokens: some start and some end inside the image's pads.
        for step in [7usize, 16] {
            let mut kv = KvCache::with_dtype(layers, KvDtype::F32);
            let mut last = None;
            let mut inside = 0;
            let mut start = 0;
            while start < ids.len() {
                let end = (start + step).min(ids.len());
                let overlaps = start < end_pad && first_pad < end;
                let skip = if overlaps {
                    start.saturating_sub(first_pad)
                } else {
                    0
                };
                inside += usize::from(first_pad < start && start < end_pad);
                let piece = MropePositions {
                    thw: std::array::from_fn(|a| positions.thw[a][start..end].to_vec()),
                    next_position: positions.next_position,
                };
                let imgs: &[ImageInput] = if overlaps { &images } else { &[] };
                let pre = model
                    .prefill_piece(
                        &ids[start..end],
                        piece,
                        imgs,
                        skip,
                        &mut kv,
                        PrefillOptions::default(),
                    )
                    .unwrap();
                last = Some(last_logits(pre));
                start = end;
            }
            assert!(inside > 0, "{fixture}: no piece started inside the image");
            let pieces = last.unwrap();
            let diff = max_abs(&whole, &pieces);
            assert!(diff <= 1e-4, "{fixture}, pieces of {step}: {diff}");
        }
    }
}

/// A piece whose image rows run out is an error, not a panic.
#[test]
fn a_piece_with_too_few_image_rows_is_refused() {
    let engine = Engine::builder(fixture_dir(FIXTURES[0])).build().unwrap();
    let model = engine.runner().model();
    let layers = model.config().text.num_hidden_layers as usize;
    let (ids, images) = prompt(&engine, FIXTURES[0]);
    let positions = model.positions(&ids, &images).unwrap();
    let mut kv = KvCache::with_dtype(layers, KvDtype::F32);
    let err = model
        .prefill_piece(
            &ids,
            positions,
            &images,
            5,
            &mut kv,
            PrefillOptions::default(),
        )
        .unwrap_err();
    assert!(err.to_string().contains("image pads"), "{err}");
    let short = MropePositions::text(0, 2);
    assert!(
        model
            .prefill_piece(&ids, short, &images, 0, &mut kv, PrefillOptions::default())
            .is_err()
    );
}
