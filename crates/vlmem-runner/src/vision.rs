//! The vision tower: patch embedding (the Conv3d as a linear map over 1536-value patches),
//! the learned position embedding interpolated bilinearly to the patch grid, pre-LN ViT
//! blocks with 2-D rotary attention over the whole image, the 2x2 patch merger and the
//! DeepStack mergers.

use crate::error::{Result, RunnerError};
use crate::nn::{Params, attention_in_row_chunks, gelu_erf, gelu_tanh, layer_norm};
use crate::preprocess::ImageInput;
use crate::rope::vision_cos_sin;
use candle_core::{Device, Tensor};
use candle_nn::rotary_emb::rope;
use vlmem_qwen3vl::config::VisionConfig;

/// LayerNorm epsilon of every vision norm.
pub const VISION_LN_EPS: f64 = 1e-6;
/// RoPE base of the ViT's 2-D rotary embedding.
pub const VISION_ROPE_THETA: f64 = 10_000.0;
const PREFIX: &str = "model.visual";

/// What the tower produces for one image.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// `[tokens, out_hidden]`: the merged image embedding, one row per image pad.
    pub image_embeds: Tensor,
    /// One `[tokens, out_hidden]` feature per DeepStack merger, added after text layer `k`.
    pub deepstack: Vec<Tensor>,
    /// Intermediates, kept only when asked for.
    pub trace: Option<VisionTrace>,
}

/// The tower's intermediates for one image (the reference's `vision.*` tensors).
#[derive(Debug, Clone)]
pub struct VisionTrace {
    /// `[patches, hidden]`: the patch embedding.
    pub patch_embed: Tensor,
    /// `[patches, hidden]`: patch embedding plus interpolated position embedding.
    pub embeddings: Tensor,
    /// `[patches, hidden]` per block: each block's output.
    pub blocks: Vec<Tensor>,
}

/// The vision tower of one model; it holds only the config and reads weights per call.
#[derive(Debug, Clone)]
pub struct VisionTower {
    cfg: VisionConfig,
    device: Device,
}

impl VisionTower {
    /// A tower for `cfg` computing on `device`.
    pub fn new(cfg: &VisionConfig, device: &Device) -> Self {
        VisionTower {
            cfg: cfg.clone(),
            device: device.clone(),
        }
    }

    fn d(&self) -> usize {
        self.cfg.hidden_size as usize
    }

    fn merge(&self) -> usize {
        self.cfg.spatial_merge_size as usize
    }

    /// Checks that every vision weight exists with the shape the config implies.
    pub fn check_weights(&self, p: &Params) -> Result<()> {
        let c = &self.cfg;
        let (d, i) = (self.d(), c.intermediate_size as usize);
        let (cin, tp, ps) = (
            c.in_channels as usize,
            c.temporal_patch_size as usize,
            c.patch_size as usize,
        );
        let md = d * self.merge() * self.merge();
        let out = c.out_hidden_size as usize;
        let mut want: Vec<(String, Vec<usize>)> = vec![
            (
                format!("{PREFIX}.patch_embed.proj.weight"),
                vec![d, cin, tp, ps, ps],
            ),
            (format!("{PREFIX}.patch_embed.proj.bias"), vec![d]),
            (
                format!("{PREFIX}.pos_embed.weight"),
                vec![c.num_position_embeddings as usize, d],
            ),
        ];
        for b in 0..c.depth {
            let pre = format!("{PREFIX}.blocks.{b}");
            for (n, s) in [
                ("norm1.weight", vec![d]),
                ("norm1.bias", vec![d]),
                ("norm2.weight", vec![d]),
                ("norm2.bias", vec![d]),
                ("attn.qkv.weight", vec![3 * d, d]),
                ("attn.qkv.bias", vec![3 * d]),
                ("attn.proj.weight", vec![d, d]),
                ("attn.proj.bias", vec![d]),
                ("mlp.linear_fc1.weight", vec![i, d]),
                ("mlp.linear_fc1.bias", vec![i]),
                ("mlp.linear_fc2.weight", vec![d, i]),
                ("mlp.linear_fc2.bias", vec![d]),
            ] {
                want.push((format!("{pre}.{n}"), s));
            }
        }
        let mut mergers = vec![(format!("{PREFIX}.merger"), d)];
        for k in 0..c.deepstack_visual_indexes.len() {
            mergers.push((format!("{PREFIX}.deepstack_merger_list.{k}"), md));
        }
        for (pre, norm) in mergers {
            want.push((format!("{pre}.norm.weight"), vec![norm]));
            want.push((format!("{pre}.norm.bias"), vec![norm]));
            want.push((format!("{pre}.linear_fc1.weight"), vec![md, md]));
            want.push((format!("{pre}.linear_fc1.bias"), vec![md]));
            want.push((format!("{pre}.linear_fc2.weight"), vec![out, md]));
            want.push((format!("{pre}.linear_fc2.bias"), vec![out]));
        }
        for (name, shape) in want {
            p.shape(&name).and_then(|found| {
                if found == shape {
                    Ok(())
                } else {
                    Err(RunnerError::TensorShape {
                        name,
                        expected: format!("{shape:?}"),
                        found,
                    })
                }
            })?;
        }
        Ok(())
    }

    /// Runs the tower over one preprocessed image; `score_bytes` bounds each attention score
    /// tensor (see [`crate::nn::attention_in_row_chunks`]); `on_block(done, blocks)` after
    /// each block.
    pub fn forward(
        &self,
        p: &Params,
        image: &ImageInput,
        trace: bool,
        score_bytes: usize,
        on_block: &dyn Fn(usize, usize),
    ) -> Result<VisionOutput> {
        let c = &self.cfg;
        let (d, m) = (self.d(), self.merge());
        let [t, gh, gw] = image.grid_thw;
        let n = t * gh * gw;
        if n == 0 || gh % m != 0 || gw % m != 0 {
            return Err(RunnerError::BadRequest(format!(
                "image grid {:?} is not a whole number of {m}x{m} merge blocks",
                image.grid_thw
            )));
        }
        if image.pixel_values.len() != n * image.patch_len {
            return Err(RunnerError::BadRequest(format!(
                "pixel_values hold {} values, grid {:?} needs {}",
                image.pixel_values.len(),
                image.grid_thw,
                n * image.patch_len
            )));
        }
        let pixels = Tensor::from_slice(&image.pixel_values, (n, image.patch_len), &self.device)?;
        // Patch embedding: Conv3d with kernel = stride = the patch, i.e. a linear map.
        let pe_w = format!("{PREFIX}.patch_embed.proj.weight");
        let (_, pe_in) = crate::weights::matrix_dims(&pe_w, &p.shape(&pe_w)?)?;
        if pe_in != image.patch_len {
            return Err(RunnerError::BadRequest(format!(
                "patch rows hold {} values, the patch embedding takes {pe_in}",
                image.patch_len,
            )));
        }
        let pe_b = format!("{PREFIX}.patch_embed.proj.bias");
        let patch_embed = p.linear_bias(&pe_w, &pe_b, &pixels)?;
        let pos = self.interpolated_pos_embed(p, image.grid_thw)?;
        let mut h = (&patch_embed + &pos)?;
        let embeddings = trace.then(|| h.clone());

        let heads = c.num_heads as usize;
        let head_dim = d / heads;
        let (cos, sin) =
            vision_cos_sin(image.grid_thw, m, head_dim, VISION_ROPE_THETA, &self.device)?;
        let mut blocks = Vec::new();
        let mut deepstack = Vec::new();
        for b in 0..c.depth as usize {
            h = self.block(p, b, &h, &cos, &sin, score_bytes)?;
            on_block(b + 1, c.depth as usize);
            if trace {
                blocks.push(h.clone());
            }
            for (k, &idx) in c.deepstack_visual_indexes.iter().enumerate() {
                if idx as usize == b {
                    let pre = format!("{PREFIX}.deepstack_merger_list.{k}");
                    deepstack.push((k, self.merger(p, &pre, &h, true)?));
                }
            }
        }
        deepstack.sort_by_key(|(k, _)| *k);
        let image_embeds = self.merger(p, &format!("{PREFIX}.merger"), &h, false)?;
        Ok(VisionOutput {
            image_embeds,
            deepstack: deepstack.into_iter().map(|(_, t)| t).collect(),
            trace: embeddings.map(|embeddings| VisionTrace {
                patch_embed,
                embeddings,
                blocks,
            }),
        })
    }

    /// `fast_pos_embed_interpolate`: the learned `side x side` table sampled bilinearly at
    /// `linspace(0, side - 1, h) x linspace(0, side - 1, w)` (f32, as torch), repeated over
    /// t and permuted to merge-block order.
    fn interpolated_pos_embed(&self, p: &Params, grid_thw: [usize; 3]) -> Result<Tensor> {
        let d = self.d();
        let m = self.merge();
        let table = p
            .get_any(&format!("{PREFIX}.pos_embed.weight"))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let side = (self.cfg.num_position_embeddings as f64).sqrt().round() as usize;
        if side == 0 || table.len() != side * side * d {
            return Err(RunnerError::TensorShape {
                name: format!("{PREFIX}.pos_embed.weight"),
                expected: format!("[{}, {d}]", side * side),
                found: vec![table.len() / d.max(1), d],
            });
        }
        let [t, gh, gw] = grid_thw;
        let hs = linspace_f32(0.0, (side - 1) as f32, gh);
        let ws = linspace_f32(0.0, (side - 1) as f32, gw);
        // Row-major (h, w) grid of interpolated embeddings.
        let mut grid = vec![0f32; gh * gw * d];
        for (yi, &y) in hs.iter().enumerate() {
            let y0 = y as usize; // `.int()`: truncation
            let y1 = (y0 + 1).min(side - 1);
            let dy = y - y0 as f32;
            for (xi, &x) in ws.iter().enumerate() {
                let x0 = x as usize;
                let x1 = (x0 + 1).min(side - 1);
                let dx = x - x0 as f32;
                let taps = [
                    (y0 * side + x0, (1.0 - dy) * (1.0 - dx)),
                    (y0 * side + x1, (1.0 - dy) * dx),
                    (y1 * side + x0, dy * (1.0 - dx)),
                    (y1 * side + x1, dy * dx),
                ];
                let out = &mut grid[(yi * gw + xi) * d..(yi * gw + xi + 1) * d];
                for (k, (row, wgt)) in taps.iter().enumerate() {
                    let src = &table[row * d..(row + 1) * d];
                    for (o, &e) in out.iter_mut().zip(src) {
                        if k == 0 {
                            *o = e * wgt;
                        } else {
                            *o += e * wgt;
                        }
                    }
                }
            }
        }
        let mut ordered = Vec::with_capacity(t * gh * gw * d);
        for _ in 0..t {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for ih in 0..m {
                        for iw in 0..m {
                            let cell = (bh * m + ih) * gw + bw * m + iw;
                            ordered.extend_from_slice(&grid[cell * d..(cell + 1) * d]);
                        }
                    }
                }
            }
        }
        Ok(Tensor::from_vec(ordered, (t * gh * gw, d), &self.device)?)
    }

    fn block(
        &self,
        p: &Params,
        b: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        score_bytes: usize,
    ) -> Result<Tensor> {
        let heads = self.cfg.num_heads as usize;
        let pre = format!("{PREFIX}.blocks.{b}");
        let w = |n: &str| p.get_any(&format!("{pre}.{n}"));
        let lin = |n: &str, x: &Tensor| {
            p.linear_bias(&format!("{pre}.{n}.weight"), &format!("{pre}.{n}.bias"), x)
        };
        let (n, d) = h.dims2()?;
        let head_dim = d / heads;
        let x = layer_norm(h, &w("norm1.weight")?, &w("norm1.bias")?, VISION_LN_EPS)?;
        let qkv = lin("attn.qkv", &x)?;
        // [n, 3, heads, hd] -> [3, heads, n, hd]
        let qkv = qkv
            .reshape((n, 3, heads, head_dim))?
            .permute((1, 2, 0, 3))?;
        let q = qkv.get(0)?.unsqueeze(0)?.contiguous()?;
        let k = qkv.get(1)?.unsqueeze(0)?.contiguous()?;
        let v = qkv.get(2)?.unsqueeze(0)?.contiguous()?;
        let q = rope(&q, cos, sin)?;
        let k = rope(&k, cos, sin)?;
        let scale = (head_dim as f64).powf(-0.5);
        // Full attention over the image, a block of query rows at a time: [1, heads, n, hd].
        let attn = attention_in_row_chunks(&q, &k, &v, scale, None, score_bytes)?;
        let attn = attn.squeeze(0)?.transpose(0, 1)?.reshape((n, d))?;
        let attn = lin("attn.proj", &attn)?;
        let h = (h + attn)?;
        let x = layer_norm(&h, &w("norm2.weight")?, &w("norm2.bias")?, VISION_LN_EPS)?;
        let x = lin("mlp.linear_fc1", &x)?;
        let x = gelu_tanh(&x)?;
        let x = lin("mlp.linear_fc2", &x)?;
        Ok((h + x)?)
    }

    /// The patch merger: LayerNorm per patch (or, post-shuffle, over the concatenation of a
    /// merge block), then fc1 -> exact GELU -> fc2 over each block of `merge^2` patches.
    fn merger(&self, p: &Params, pre: &str, h: &Tensor, postshuffle: bool) -> Result<Tensor> {
        let w = |n: &str| p.get_any(&format!("{pre}.{n}"));
        let (n, d) = h.dims2()?;
        let unit = self.merge() * self.merge();
        let grouped = (n / unit, d * unit);
        let x = if postshuffle {
            layer_norm(
                &h.reshape(grouped)?,
                &w("norm.weight")?,
                &w("norm.bias")?,
                VISION_LN_EPS,
            )?
        } else {
            layer_norm(h, &w("norm.weight")?, &w("norm.bias")?, VISION_LN_EPS)?.reshape(grouped)?
        };
        let lin = |n: &str, x: &Tensor| {
            p.linear_bias(&format!("{pre}.{n}.weight"), &format!("{pre}.{n}.bias"), x)
        };
        let x = lin("linear_fc1", &x)?;
        let x = gelu_erf(&x)?;
        lin("linear_fc2", &x)
    }
}

/// `torch.linspace(start, end, steps)` in f32: the first half counts up from `start`, the
/// second half down from `end`, as ATen does.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f32;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        start + step * i as f32
                    } else {
                        end - step * (steps - i - 1) as f32
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::linspace_f32;

    #[test]
    fn linspace_hits_both_ends() {
        let v = linspace_f32(0.0, 7.0, 20);
        assert_eq!(v.len(), 20);
        assert_eq!(v[0], 0.0);
        assert_eq!(v[19], 7.0);
        assert!(v.windows(2).all(|w| w[1] > w[0]));
        assert_eq!(linspace_f32(0.0, 7.0, 1), vec![0.0]);
    }
}
