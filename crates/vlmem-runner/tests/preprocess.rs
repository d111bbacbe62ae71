//! Image preprocessing beyond the fixture image: the patch order, resizing into the pixel
//! bounds, and JPEG input.

use image::RgbImage;
use vlmem_qwen3vl::Qwen3VlConfig;
use vlmem_runner::PreprocessConfig;
use vlmem_runner::preprocess::{decode_image, preprocess};

fn config() -> PreprocessConfig {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/qwen3-vl-tiny/config.json");
    let cfg = Qwen3VlConfig::from_file(&dir).unwrap();
    PreprocessConfig::for_vision(&cfg.vision)
}

/// The normalised value of 8-bit `v` (rescale 1/255, mean = std = 0.5).
fn norm(v: u8) -> f32 {
    ((f64::from(v) / 255.0) as f32 - 0.5) / 0.5
}

#[test]
fn rows_follow_merge_blocks_and_hold_c_t_p_p() {
    // 256x256 needs no resize. Red encodes the patch column, green the patch row, blue the
    // pixel's position inside its patch row.
    let img = RgbImage::from_fn(256, 256, |x, y| {
        image::Rgb([(x / 16) as u8 * 10, (y / 16) as u8 * 10, (x % 16) as u8])
    });
    let cfg = config();
    let out = preprocess(&img, &cfg).unwrap();
    assert_eq!(out.grid_thw, [1, 16, 16]);
    assert_eq!(out.patch_len, 1536);
    assert_eq!(out.num_tokens(2), 64);
    let row = |r: usize| &out.pixel_values[r * 1536..(r + 1) * 1536];
    // Row r = ((block_row * 8 + block_col) * 2 + in_row) * 2 + in_col.
    for (r, (prow, pcol)) in [
        (0, (0, 0)),
        (1, (0, 1)),
        (2, (1, 0)),
        (3, (1, 1)),
        (4, (0, 2)),
        (17, (0, 9)),
        (35, (3, 1)),
    ] {
        let v = row(r);
        // Channel 0 (both frames, all 256 pixels) is the column code.
        assert!(
            v[..512].iter().all(|&x| x == norm(pcol as u8 * 10)),
            "row {r} red"
        );
        assert!(
            v[512..1024].iter().all(|&x| x == norm(prow as u8 * 10)),
            "row {r} green"
        );
        // Channel 2: each 16-pixel line counts 0..15, in both temporal copies.
        for t in 0..2 {
            for line in 0..16 {
                let start = 1024 + t * 256 + line * 16;
                let want: Vec<f32> = (0..16).map(|i| norm(i as u8)).collect();
                assert_eq!(&v[start..start + 16], want.as_slice(), "row {r} blue");
            }
        }
    }
}

#[test]
fn small_and_odd_images_are_resized_into_bounds() {
    let cfg = config();
    // Below min_pixels: 64x64 grows to 256x256 (64 tokens).
    let small = RgbImage::from_pixel(64, 64, image::Rgb([255, 0, 128]));
    let out = preprocess(&small, &cfg).unwrap();
    assert_eq!(out.resized_wh, (256, 256));
    assert_eq!(out.grid_thw, [1, 16, 16]);
    assert!(out.pixel_values[..512].iter().all(|&v| v == 1.0));
    assert!(out.pixel_values[512..1024].iter().all(|&v| v == -1.0));
    // 1280x720 rounds to 1280x704 (the research table's 880 tokens).
    let wide = RgbImage::from_fn(1280, 720, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
    });
    let out = preprocess(&wide, &cfg).unwrap();
    assert_eq!(out.resized_wh, (1280, 704));
    assert_eq!(out.grid_thw, [1, 44, 80]);
    assert_eq!(out.num_tokens(2), 880);
    assert!(out.pixel_values.iter().all(|v| (-1.0..=1.0).contains(v)));
    // An aspect ratio over 200 is refused, not a panic.
    let thin = RgbImage::from_pixel(1000, 4, image::Rgb([0, 0, 0]));
    assert!(preprocess(&thin, &cfg).is_err());
}

#[test]
fn jpeg_input_is_decoded() {
    let img = RgbImage::from_fn(300, 240, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Jpeg,
    )
    .unwrap();
    let back = decode_image(&bytes).unwrap();
    assert_eq!((back.width(), back.height()), (300, 240));
    let out = preprocess(&back, &config()).unwrap();
    // smart_resize: round(240 / 32) = 8 -> 256 rows, round(300 / 32) = 9 -> 288 columns.
    assert_eq!(out.resized_wh, (288, 256));
    assert_eq!(out.grid_thw, [1, 16, 18]);
}
