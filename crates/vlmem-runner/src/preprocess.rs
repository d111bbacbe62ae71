//! Image preprocessing as the released Qwen3-VL processor does it: `smart_resize` to
//! multiples of `patch_size x merge_size` within [min_pixels, max_pixels], a PIL-compatible
//! bicubic resize (8-bit fixed point, antialiased when shrinking), rescale by 1/255,
//! normalize with mean = std = 0.5, the still image repeated to fill the temporal patch, and
//! patches ordered by 2x2 merge block with each row laid out `(C, T, patch, patch)`.

use crate::error::{Result, RunnerError};
use image::RgbImage;
use std::path::{Path, PathBuf};
use vlmem_qwen3vl::config::VisionConfig;
use vlmem_qwen3vl::math::{MAX_PIXELS, MIN_PIXELS, smart_resize};

/// The processor's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessConfig {
    /// Pixels per patch side (16).
    pub patch_size: usize,
    /// Frames per temporal patch (2); a still image is repeated to fill it.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one LLM token (2).
    pub merge_size: usize,
    /// Lower bound on resized pixels (`size.shortest_edge`, 65,536 released).
    pub min_pixels: u64,
    /// Upper bound on resized pixels (`size.longest_edge`, 16,777,216 released).
    pub max_pixels: u64,
    /// Multiplier applied to 8-bit values before normalising (1/255).
    pub rescale_factor: f64,
    /// Per-channel mean subtracted after rescaling.
    pub image_mean: [f32; 3],
    /// Per-channel standard deviation divided by after subtracting the mean.
    pub image_std: [f32; 3],
}

impl PreprocessConfig {
    /// The released processor's settings for a model with this vision config.
    pub fn for_vision(v: &VisionConfig) -> Self {
        PreprocessConfig {
            patch_size: v.patch_size as usize,
            temporal_patch_size: v.temporal_patch_size as usize,
            merge_size: v.spatial_merge_size as usize,
            min_pixels: MIN_PIXELS,
            max_pixels: MAX_PIXELS,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.5; 3],
            image_std: [0.5; 3],
        }
    }

    /// Values in one patch row: `3 x temporal x patch x patch` (1536 released).
    pub fn patch_len(&self) -> usize {
        3 * self.temporal_patch_size * self.patch_size * self.patch_size
    }
}

/// One preprocessed image: what the vision tower takes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInput {
    /// `[patches, patch_len]` row-major, rows in 2x2 merge-block order.
    pub pixel_values: Vec<f32>,
    /// Patch grid `(t, h, w)`: temporal patches, patch rows, patch columns.
    pub grid_thw: [usize; 3],
    /// Values per row (`PreprocessConfig::patch_len`).
    pub patch_len: usize,
    /// Width x height after smart_resize, in pixels.
    pub resized_wh: (usize, usize),
}

impl ImageInput {
    /// ViT patches (`t * h * w`).
    pub fn num_patches(&self) -> usize {
        self.grid_thw.iter().product()
    }

    /// LLM tokens after the `merge x merge` merge.
    pub fn num_tokens(&self, merge_size: usize) -> usize {
        self.num_patches() / (merge_size * merge_size)
    }

    /// A 64-bit hash of what the vision tower sees (the grid, the row length and every
    /// value's bits): equal images hash equal; different ones rarely collide (it is not a
    /// cryptographic hash).
    pub fn content_hash(&self) -> u64 {
        // One multiply-xorshift round per 64-bit word (two values), in the manner of
        // wyhash: fast enough to be noise beside the tower itself.
        let mix = |h: u64, w: u64| {
            let x = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            x ^ (x >> 29)
        };
        let mut h = 0x243f_6a88_85a3_08d3u64;
        for d in self.grid_thw.iter().chain([&self.patch_len]) {
            h = mix(h, *d as u64);
        }
        let mut pairs = self.pixel_values.chunks_exact(2);
        for p in &mut pairs {
            h = mix(
                h,
                u64::from(p[0].to_bits()) | (u64::from(p[1].to_bits()) << 32),
            );
        }
        for v in pairs.remainder() {
            h = mix(h, u64::from(v.to_bits()));
        }
        mix(h, self.pixel_values.len() as u64)
    }
}

/// Decodes a PNG or JPEG file into 8-bit RGB (alpha dropped, grey expanded).
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|e| RunnerError::io(path, e))?;
    decode_image_at(&bytes, path.to_path_buf())
}

/// Decodes PNG or JPEG bytes into 8-bit RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    decode_image_at(bytes, PathBuf::from("<memory>"))
}

fn decode_image_at(bytes: &[u8], path: PathBuf) -> Result<RgbImage> {
    let img = image::load_from_memory(bytes).map_err(|e| RunnerError::Image {
        path,
        message: e.to_string(),
    })?;
    Ok(img.to_rgb8())
}

/// Preprocesses one still image: smart_resize, bicubic resize, rescale, normalize, temporal
/// repeat, merge-block patch order.
pub fn preprocess(img: &RgbImage, cfg: &PreprocessConfig) -> Result<ImageInput> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let factor = cfg.patch_size * cfg.merge_size;
    if factor == 0 || cfg.temporal_patch_size == 0 {
        return Err(RunnerError::BadRequest(
            "patch_size, merge_size and temporal_patch_size must be positive".into(),
        ));
    }
    let (rh, rw) = smart_resize(
        h as u64,
        w as u64,
        factor as u64,
        cfg.min_pixels,
        cfg.max_pixels,
    )?;
    let (rh, rw) = (rh as usize, rw as usize);
    let resized;
    let src = if (rw, rh) == (w, h) {
        img
    } else {
        resized = resize_bicubic(img, rw, rh)?;
        &resized
    };
    let (p, m, tp) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (rh / p, rw / p);
    // Normalised planes [C][H][W].
    let plane = rh * rw;
    let mut norm = vec![0f32; 3 * plane];
    for (i, px) in src.pixels().enumerate() {
        for c in 0..3 {
            let rescaled = (f64::from(px.0[c]) * cfg.rescale_factor) as f32;
            norm[c * plane + i] = (rescaled - cfg.image_mean[c]) / cfg.image_std[c];
        }
    }
    let patch_len = cfg.patch_len();
    let mut out = Vec::with_capacity(gh * gw * patch_len);
    for bh in 0..gh / m {
        for bw in 0..gw / m {
            for ih in 0..m {
                for iw in 0..m {
                    let (py, px) = (bh * m + ih, bw * m + iw);
                    for c in 0..3 {
                        // A still image fills every temporal slot with the same frame.
                        for _t in 0..tp {
                            for y in 0..p {
                                let row = c * plane + (py * p + y) * rw + px * p;
                                out.extend_from_slice(&norm[row..row + p]);
                            }
                        }
                    }
                }
            }
        }
    }
    Ok(ImageInput {
        pixel_values: out,
        grid_thw: [1, gh, gw],
        patch_len,
        resized_wh: (rw, rh),
    })
}

// ---- PIL-compatible bicubic resampling (Pillow's Resample.c, 8 bits per channel) ---------

const PRECISION_BITS: u32 = 32 - 8 - 2;
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: the first input index and the fixed-point weights.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; clamping below at 0 makes that a floor here.
        let xmin = ((center - support + 0.5).trunc().max(0.0)) as usize;
        let xmax = ((center + support + 0.5).trunc() as usize).min(in_size);
        let n = xmax.saturating_sub(xmin).min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..ksize {
            let v = if x < n && ww != 0.0 {
                k[x] / ww
            } else if x < n {
                k[x]
            } else {
                0.0
            };
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            weights[xx * ksize + x] = if v < 0.0 {
                (scaled - 0.5).trunc() as i32
            } else {
                (scaled + 0.5).trunc() as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        ksize,
        bounds,
        weights,
    }
}

fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes 8-bit RGB to `out_w x out_h` exactly as Pillow's `Image.resize(..., BICUBIC)`:
/// separable passes (horizontal, then vertical), support widened by the scale when
/// shrinking (antialias), 22-bit fixed-point weights, rounding and clipping to 8 bits after
/// each pass.
pub fn resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> Result<RgbImage> {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    if out_w == 0 || out_h == 0 || in_w == 0 || in_h == 0 {
        return Err(RunnerError::BadRequest(format!(
            "cannot resize a {in_w}x{in_h} image to {out_w}x{out_h}"
        )));
    }
    let src = img.as_raw();
    let round = 1i32 << (PRECISION_BITS - 1);
    // Horizontal pass: in_h rows of out_w pixels (Pillow skips it when widths agree).
    let horiz: Vec<u8> = if out_w == in_w {
        src.clone()
    } else {
        let c = precompute_coeffs(in_w, out_w);
        let mut tmp = vec![0u8; in_h * out_w * 3];
        for y in 0..in_h {
            for (xx, &(xmin, n)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + n];
                let mut acc = [round; 3];
                for (x, &kx) in k.iter().enumerate() {
                    let base = (y * in_w + xmin + x) * 3;
                    for ch in 0..3 {
                        acc[ch] += i32::from(src[base + ch]) * kx;
                    }
                }
                let o = (y * out_w + xx) * 3;
                for ch in 0..3 {
                    tmp[o + ch] = clip8(acc[ch]);
                }
            }
        }
        tmp
    };
    // Vertical pass.
    let out: Vec<u8> = if out_h == in_h {
        horiz
    } else {
        let c = precompute_coeffs(in_h, out_h);
        let mut dst = vec![0u8; out_h * out_w * 3];
        for (yy, &(ymin, n)) in c.bounds.iter().enumerate() {
            let k = &c.weights[yy * c.ksize..yy * c.ksize + n];
            for x in 0..out_w {
                let mut acc = [round; 3];
                for (y, &ky) in k.iter().enumerate() {
                    let base = ((ymin + y) * out_w + x) * 3;
                    for ch in 0..3 {
                        acc[ch] += i32::from(horiz[base + ch]) * ky;
                    }
                }
                let o = (yy * out_w + x) * 3;
                for ch in 0..3 {
                    dst[o + ch] = clip8(acc[ch]);
                }
            }
        }
        dst
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out).ok_or_else(|| {
        RunnerError::BadRequest("resized buffer does not match its dimensions".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bicubic_kernel_is_a_partition_of_unity() {
        for i in 0..10 {
            let t = i as f64 / 10.0;
            let s: f64 = (-2..=2).map(|k| bicubic_filter(t - k as f64)).sum();
            assert!((s - 1.0).abs() < 1e-12, "offset {t}: sum {s}");
        }
    }

    #[test]
    fn resizing_a_flat_image_keeps_it_flat() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 250]));
        for (w, h) in [(64, 64), (16, 9), (37, 50), (100, 23)] {
            let out = resize_bicubic(&img, w, h).unwrap();
            assert_eq!((out.width(), out.height()), (w as u32, h as u32));
            assert!(out.pixels().all(|p| p.0 == [10, 128, 250]), "{w}x{h}");
        }
    }
}
