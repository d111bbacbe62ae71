//! Rotary position embeddings: the multimodal positions of a prompt (the reference's
//! `get_rope_index`), the text decoder's interleaved M-RoPE tables, and the vision tower's
//! 2-D (row, column) rotary tables.

use crate::error::{Result, RunnerError};
use candle_core::{Device, Tensor};

/// Multimodal RoPE positions of a token sequence: one (t, h, w) triple per token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MropePositions {
    /// Temporal, row and column positions, each one entry per token.
    pub thw: [Vec<i64>; 3],
    /// The position the next generated token takes on all three axes
    /// (max over the prompt + 1).
    pub next_position: i64,
}

impl MropePositions {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.thw[0].len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.thw[0].is_empty()
    }

    /// Positions of `count` text tokens starting at `start` on all three axes.
    pub fn text(start: i64, count: usize) -> Self {
        let p: Vec<i64> = (0..count as i64).map(|i| start + i).collect();
        MropePositions {
            thw: [p.clone(), p.clone(), p],
            next_position: start + count as i64,
        }
    }
}

/// The reference's `get_rope_index` for a prompt with images: text tokens take t = h = w =
/// the running position; the `t*h*w / merge^2` pads of image k take t = const, h = row,
/// w = column (merged grid) offset by the running position, which then advances by the
/// largest of the merged grid's sides. `image_grids_thw` are the images' patch grids, in
/// prompt order.
///
/// Errors when a run of image pads has no image, its length differs from its image's token
/// count, an image has no run, or the prompt holds video pads.
pub fn rope_index(
    ids: &[u32],
    image_grids_thw: &[[usize; 3]],
    merge_size: usize,
    image_token_id: u32,
    video_token_id: u32,
) -> Result<MropePositions> {
    let mut thw: [Vec<i64>; 3] = Default::default();
    for axis in &mut thw {
        axis.reserve(ids.len());
    }
    let mut next: i64 = 0;
    let mut image = 0usize;
    let mut i = 0usize;
    while i < ids.len() {
        let id = ids[i];
        if id == video_token_id {
            return Err(RunnerError::BadRequest(format!(
                "prompt position {i} holds a video pad ({video_token_id}); video input is not supported"
            )));
        }
        if id != image_token_id {
            for axis in &mut thw {
                axis.push(next);
            }
            next += 1;
            i += 1;
            continue;
        }
        let grid = image_grids_thw.get(image).ok_or_else(|| {
            RunnerError::ImagePadMismatch(format!(
                "the prompt has more runs of image pads than the {} image(s) given (run {} starts at position {i})",
                image_grids_thw.len(),
                image + 1
            ))
        })?;
        let (t, gh, gw) = (grid[0], grid[1] / merge_size, grid[2] / merge_size);
        let count = t * gh * gw;
        let run = ids[i..]
            .iter()
            .take_while(|&&x| x == image_token_id)
            .count();
        if run != count {
            return Err(RunnerError::ImagePadMismatch(format!(
                "image {} needs {count} image pads but the prompt has a run of {run} at position {i}",
                image + 1
            )));
        }
        for ti in 0..t {
            for hi in 0..gh {
                for wi in 0..gw {
                    thw[0].push(next + ti as i64);
                    thw[1].push(next + hi as i64);
                    thw[2].push(next + wi as i64);
                }
            }
        }
        next += t.max(gh).max(gw) as i64;
        image += 1;
        i += count;
    }
    if image != image_grids_thw.len() {
        return Err(RunnerError::ImagePadMismatch(format!(
            "{} image(s) given but the prompt has image pads for {image}",
            image_grids_thw.len()
        )));
    }
    Ok(MropePositions {
        thw,
        next_position: next,
    })
}

/// `1 / theta^(2i / dim)` for `i < dim / 2`, computed in f32 as the reference does.
pub fn inv_freq(dim: usize, theta: f64) -> Vec<f32> {
    let base = theta as f32;
    (0..dim)
        .step_by(2)
        .map(|i| 1.0f32 / base.powf(i as f32 / dim as f32))
        .collect()
}

/// Which of (t, h, w) drives each of the `head_dim / 2` rotary slots. Interleaved (all
/// released sizes): slots `1, 4, 7, ...` below `3 * section[1]` are h, slots `2, 5, 8, ...`
/// below `3 * section[2]` are w, the rest t. Otherwise contiguous chunks of
/// `section[0], section[1], section[2]`.
pub fn mrope_axes(half_dim: usize, section: &[usize; 3], interleaved: bool) -> Vec<usize> {
    let mut axes = vec![0usize; half_dim];
    if interleaved {
        for (axis, &len) in section.iter().enumerate().skip(1) {
            let mut j = axis;
            while j < (3 * len).min(half_dim) {
                axes[j] = axis;
                j += 3;
            }
        }
    } else {
        let mut j = 0;
        for (axis, &len) in section.iter().enumerate() {
            for _ in 0..len {
                if j < half_dim {
                    axes[j] = axis;
                }
                j += 1;
            }
        }
    }
    axes
}

/// The text decoder's rotary tables for `positions`: `(cos, sin)`, each `[tokens, head_dim/2]`
/// (the halves of the reference's `cat(freqs, freqs)` are equal, so half is enough).
pub fn text_cos_sin(
    positions: &MropePositions,
    inv_freq: &[f32],
    axes: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let n = positions.len();
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(n * half);
    let mut sin = Vec::with_capacity(n * half);
    for tok in 0..n {
        for (&f, &axis) in inv_freq.iter().zip(axes) {
            let angle = positions.thw[axis][tok] as f32 * f;
            cos.push(angle.cos());
            sin.push(angle.sin());
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, half), device)?,
        Tensor::from_vec(sin, (n, half), device)?,
    ))
}

/// The vision tower's 2-D rotary tables for one image of patch grid `(t, h, w)`, rows in
/// merge-block order: `(cos, sin)`, each `[t*h*w, head_dim/2]`, the first quarter of the head
/// rotated by the patch row and the second by the patch column.
pub fn vision_cos_sin(
    grid_thw: [usize; 3],
    merge_size: usize,
    head_dim: usize,
    theta: f64,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let freqs = inv_freq(head_dim / 2, theta);
    let quarter = freqs.len();
    let [t, h, w] = grid_thw;
    let n = t * h * w;
    let mut cos = Vec::with_capacity(n * 2 * quarter);
    let mut sin = Vec::with_capacity(n * 2 * quarter);
    for _ in 0..t {
        for bh in 0..h / merge_size {
            for bw in 0..w / merge_size {
                for ih in 0..merge_size {
                    for iw in 0..merge_size {
                        let row = (bh * merge_size + ih) as f32;
                        let col = (bw * merge_size + iw) as f32;
                        for coord in [row, col] {
                            for &f in &freqs {
                                let angle = coord * f;
                                cos.push(angle.cos());
                                sin.push(angle.sin());
                            }
                        }
                    }
                }
            }
        }
    }
    Ok((
        Tensor::from_vec(cos, (n, 2 * quarter), device)?,
        Tensor::from_vec(sin, (n, 2 * quarter), device)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_axes_follow_the_reference_pattern() {
        // Released sizes: head_dim 128, section [24, 20, 20] -> THW THW ... then T.
        let axes = mrope_axes(64, &[24, 20, 20], true);
        assert_eq!(&axes[..6], &[0, 1, 2, 0, 1, 2]);
        assert_eq!(axes.iter().filter(|&&a| a == 1).count(), 20);
        assert_eq!(axes.iter().filter(|&&a| a == 2).count(), 20);
        assert_eq!(&axes[60..], &[0, 0, 0, 0]);
        let chunked = mrope_axes(8, &[4, 2, 2], false);
        assert_eq!(chunked, vec![0, 0, 0, 0, 1, 1, 2, 2]);
    }

    #[test]
    fn image_advances_the_position_by_its_longest_merged_side() {
        // 2 text, an 8x4 patch grid (4x2 merged = 8 pads), 1 text.
        let ids = [5, 6, 9, 9, 9, 9, 9, 9, 9, 9, 7];
        let p = rope_index(&ids, &[[1, 8, 4]], 2, 9, 10).unwrap();
        assert_eq!(p.thw[0], vec![0, 1, 2, 2, 2, 2, 2, 2, 2, 2, 6]);
        assert_eq!(p.thw[1], vec![0, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
        assert_eq!(p.thw[2], vec![0, 1, 2, 3, 2, 3, 2, 3, 2, 3, 6]);
        assert_eq!(p.next_position, 7);
    }

    #[test]
    fn pad_and_image_counts_must_agree() {
        let ids = [5, 9, 9, 9, 9, 7];
        assert!(rope_index(&ids, &[], 2, 9, 10).is_err());
        assert!(rope_index(&ids, &[[1, 2, 4]], 2, 9, 10).is_err());
        assert!(rope_index(&ids, &[[1, 4, 4], [1, 4, 4]], 2, 9, 10).is_err());
        assert!(rope_index(&ids, &[[1, 4, 4]], 2, 9, 10).is_ok());
        assert!(rope_index(&[5, 10], &[], 2, 9, 10).is_err());
    }
}
