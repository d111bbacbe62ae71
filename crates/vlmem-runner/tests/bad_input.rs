//! Bad input comes back as typed errors, never a panic: missing files, a corrupt
//! safetensors, a file that is not an image, prompt ids out of the vocabulary, image pads
//! that do not match the images.

use std::fs;
use std::path::{Path, PathBuf};
use vlmem_runner::preprocess::{decode_image, load_image};
use vlmem_runner::{GenerateOptions, Runner, RunnerError};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-vl-tiny")
}

/// A copy of the dense fixture's model files in a temporary folder.
fn copy_fixture(to: &Path) {
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "image0.png",
    ] {
        fs::copy(fixture_dir().join(f), to.join(f)).unwrap();
    }
}

#[test]
fn missing_folder_and_files_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let err = Runner::open(&tmp.path().join("nope")).unwrap_err();
    assert!(matches!(err, RunnerError::Checkpoint(_)), "{err}");
    // No config.json.
    let err = Runner::open(tmp.path()).unwrap_err();
    assert!(matches!(err, RunnerError::Checkpoint(_)), "{err}");
    // No tokenizer.json: the folder opens and runs from ids, a text prompt is a clear error
    // and replies are not decoded.
    copy_fixture(tmp.path());
    fs::remove_file(tmp.path().join("tokenizer.json")).unwrap();
    let runner = Runner::open(tmp.path()).unwrap();
    assert!(runner.tokenizer().is_none());
    let err = runner.chat_ids("hello", &[]).unwrap_err();
    assert!(matches!(err, RunnerError::MissingFile { .. }), "{err}");
    assert_eq!(runner.decode(&[1, 2]).unwrap(), None);
    let g = runner
        .generate_ids(&[1, 2, 3], &[], 2, &mut |_| {})
        .unwrap();
    assert_eq!(g.generated_ids.len(), 2);
    // A tokenizer.json that is there but broken is an error.
    fs::write(tmp.path().join("tokenizer.json"), b"{ not json").unwrap();
    let err = Runner::open(tmp.path()).unwrap_err();
    assert!(matches!(err, RunnerError::Tokenizer(_)), "{err}");
    // No weights.
    copy_fixture(tmp.path());
    fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let err = Runner::open(tmp.path()).unwrap_err();
    assert!(matches!(err, RunnerError::Checkpoint(_)), "{err}");
    // A missing image file.
    copy_fixture(tmp.path());
    let runner = Runner::open(tmp.path()).unwrap();
    let err = runner
        .load_images(&[tmp.path().join("absent.png")])
        .unwrap_err();
    assert!(matches!(err, RunnerError::Io { .. }), "{err}");
}

#[test]
fn corrupt_safetensors_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    copy_fixture(tmp.path());
    let weights = tmp.path().join("model.safetensors");
    let bytes = fs::read(&weights).unwrap();
    // Truncated in the middle of the data.
    fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = Runner::open(tmp.path()).unwrap_err();
    assert!(matches!(err, RunnerError::Checkpoint(_)), "{err}");
    // Garbage header.
    let mut garbage = bytes.clone();
    for b in &mut garbage[8..64] {
        *b = b'#';
    }
    fs::write(&weights, &garbage).unwrap();
    let err = Runner::open(tmp.path()).unwrap_err();
    assert!(matches!(err, RunnerError::Checkpoint(_)), "{err}");
    // Too short to hold a header length.
    fs::write(&weights, b"abc").unwrap();
    let err = Runner::open(tmp.path()).unwrap_err();
    assert!(matches!(err, RunnerError::Checkpoint(_)), "{err}");
}

#[test]
fn a_file_that_is_not_an_image_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("fake.png");
    fs::write(&fake, b"this is not a PNG at all").unwrap();
    let err = load_image(&fake).unwrap_err();
    assert!(matches!(err, RunnerError::Image { .. }), "{err}");
    // A truncated real PNG.
    let png = fs::read(fixture_dir().join("image0.png")).unwrap();
    let err = decode_image(&png[..png.len() / 3]).unwrap_err();
    assert!(matches!(err, RunnerError::Image { .. }), "{err}");
    // A JPEG decodes.
    let img = load_image(&fixture_dir().join("image0.png")).unwrap();
    let jpeg = tmp.path().join("photo.jpg");
    img.save(&jpeg).unwrap();
    let back = load_image(&jpeg).unwrap();
    assert_eq!((back.width(), back.height()), (320, 256));
}

#[test]
fn ids_out_of_vocabulary_are_errors() {
    let runner = Runner::open(&fixture_dir()).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 2,
        stop_ids: vec![],
        ..Default::default()
    };
    let err = runner
        .model()
        .generate(&[11, 12, 1024, 13], &[], &opts, &mut |_| {})
        .unwrap_err();
    assert!(
        matches!(
            err,
            RunnerError::TokenOutOfVocab {
                id: 1024,
                position: 2,
                vocab_size: 1024
            }
        ),
        "{err}"
    );
    let err = runner
        .model()
        .generate(&[u32::MAX], &[], &opts, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunnerError::TokenOutOfVocab { .. }), "{err}");
    let err = runner
        .model()
        .generate(&[], &[], &opts, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunnerError::BadRequest(_)), "{err}");
}

#[test]
fn image_pads_must_match_the_images() {
    let dir = fixture_dir();
    let runner = Runner::open(&dir).unwrap();
    let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let opts = GenerateOptions {
        max_new_tokens: 1,
        stop_ids: vec![],
        ..Default::default()
    };
    let pad = runner.model().config().image_token_id;
    let good = runner.chat_ids("hi", &images).unwrap();
    // Pads but no image: more image pads than images.
    let err = runner
        .model()
        .generate(&good, &[], &opts, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunnerError::ImagePadMismatch(_)), "{err}");
    // Two runs of pads, one image.
    let two = runner
        .chat_ids("hi", &[images[0].clone(), images[0].clone()])
        .unwrap();
    let err = runner
        .model()
        .generate(&two, &images, &opts, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunnerError::ImagePadMismatch(_)), "{err}");
    // One pad too many in the run.
    let mut long = good.clone();
    let first = long.iter().position(|&t| t == pad).unwrap();
    long.insert(first, pad);
    let err = runner
        .model()
        .generate(&long, &images, &opts, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunnerError::ImagePadMismatch(_)), "{err}");
    // An image but no pads.
    let text_only = runner.chat_ids("hi", &[]).unwrap();
    let err = runner
        .model()
        .generate(&text_only, &images, &opts, &mut |_| {})
        .unwrap_err();
    assert!(matches!(err, RunnerError::ImagePadMismatch(_)), "{err}");
    // And the matching prompt runs.
    let g = runner
        .model()
        .generate(&good, &images, &opts, &mut |_| {})
        .unwrap();
    assert_eq!(g.generated_ids.len(), 1);
}
