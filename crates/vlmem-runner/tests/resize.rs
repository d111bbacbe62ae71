//! The bicubic resize against Pillow's own output (tests/data/pil_bicubic_golden.txt, made by
//! tests/data/gen_pil_bicubic_golden.py with Pillow 13): byte for byte on a synthetic image
//! (upscale, downscale, mixed) and by hash on the fixture photo.

use image::RgbImage;
use std::path::PathBuf;
use vlmem_runner::preprocess::{load_image, resize_bicubic};

fn synthetic(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + y * 91) % 256) as u8,
            ((x * 11 + y * 201 + 53) % 256) as u8,
            ((x * x + y * 7 + 106) % 256) as u8,
        ])
    })
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn parse_pair(s: &str) -> (usize, usize) {
    let s = s.trim().trim_start_matches('(').trim_end_matches(')');
    let mut it = s.split(',').map(|v| v.trim().parse::<usize>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

#[test]
fn bicubic_matches_pillow_byte_for_byte() {
    let golden = include_str!("data/pil_bicubic_golden.txt");
    let src = synthetic(13, 7);
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/qwen3-vl-tiny/image0.png");
    let photo = load_image(&fixture).unwrap();
    let mut checked = 0;
    for line in golden.lines() {
        if let Some(rest) = line.strip_prefix("fixture ") {
            // fixture (w, h) 0xHASH [first bytes]
            let close = rest.find(')').unwrap();
            let (w, h) = parse_pair(&rest[..=close]);
            let hash = rest[close + 1..].split_whitespace().next().unwrap();
            let want = u64::from_str_radix(hash.trim_start_matches("0x"), 16).unwrap();
            let out = resize_bicubic(&photo, w, h).unwrap();
            assert_eq!(fnv1a64(out.as_raw()), want, "fixture photo to {w}x{h}");
        } else {
            let close = line.find(')').unwrap();
            let (w, h) = parse_pair(&line[..=close]);
            let want: Vec<u8> = line[close + 1..]
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .map(|v| v.trim().parse().unwrap())
                .collect();
            let out = resize_bicubic(&src, w, h).unwrap();
            assert_eq!(out.as_raw(), &want, "synthetic 13x7 to {w}x{h}");
        }
        checked += 1;
    }
    assert_eq!(checked, 7);
}
