//! The vision tower: patch embedding (the Conv3d as a linear map over 1536-value patches),
//! the learned position embedding interpolated bilinearly to the patch grid, pre-LN ViT
//! blocks with 2-D rotary attention over the whole image, the 2x2 patch merger and the
//! DeepStack mergers.

use crate::error::{Result, RunnerError};
use crate::kernels::attention::{Isa, Output, Shape, View, attention_views};
use crate::kernels::gelu::gelu_tanh_on_this_thread;
use crate::nn::{Params, attention_in_row_chunks, gelu_erf, layer_norm, with_values};
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
        // On the CPU the blocks rotate the queries and keys in place (`[n, head_dim / 2]`).
        let rope_values = if self.device.is_cpu() {
            Some((
                cos.flatten_all()?.to_vec1::<f32>()?,
                sin.flatten_all()?.to_vec1::<f32>()?,
            ))
        } else {
            None
        };
        let rope = Rope {
            cos: &cos,
            sin: &sin,
            values: rope_values
                .as_ref()
                .map(|(c, s)| (c.as_slice(), s.as_slice())),
        };
        let mut blocks = Vec::new();
        let mut deepstack = Vec::new();
        for b in 0..c.depth as usize {
            h = self.block(p, b, &h, &rope, score_bytes)?;
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
        rope_cs: &Rope,
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
        let scale = (head_dim as f64).powf(-0.5);
        let norm = |x: &Tensor, name: &str| {
            let (wn, bn) = (w(&format!("{name}.weight"))?, w(&format!("{name}.bias"))?);
            if self.device.is_cpu() {
                layer_norm_rows(x, &wn, &bn, VISION_LN_EPS)
            } else {
                layer_norm(x, &wn, &bn, VISION_LN_EPS)
            }
        };
        let x = norm(h, "norm1")?;
        let attn = match rope_cs.values {
            Some((cos, sin)) if head_dim > 0 && head_dim.is_multiple_of(2) => {
                // The qkv rows `[n, 3, heads, hd]` as the product leaves them: the queries
                // and keys rotated in place, then attention reading them there and writing
                // each row's heads side by side, `[n, d]`, as the projection takes them.
                let half = head_dim / 2;
                if cos.len() != n * half || sin.len() != n * half {
                    return Err(RunnerError::BadRequest(format!(
                        "rotary tables of {} values for {n} patches of {half}",
                        cos.len()
                    )));
                }
                let (qkv, _, width) = p.linear_bias_rows(
                    &format!("{pre}.attn.qkv.weight"),
                    &format!("{pre}.attn.qkv.bias"),
                    &x,
                    |row0, rows| rope_qk_rows(rows, row0, d, head_dim, cos, sin),
                )?;
                if width != 3 * d {
                    return Err(RunnerError::BadRequest(format!(
                        "{pre}.attn.qkv gives {width} values a patch, not {}",
                        3 * d
                    )));
                }
                let view = |part: usize| View {
                    values: &qkv,
                    offset: part * d,
                    head_stride: head_dim,
                    row_stride: 3 * d,
                };
                let shape = Shape {
                    heads,
                    kv_heads: heads,
                    n,
                    keys: n,
                    d: head_dim,
                    dv: head_dim,
                    scale: scale as f32,
                    past: None,
                };
                let out = attention_views(
                    Isa::best(),
                    view(0),
                    view(1),
                    view(2),
                    &shape,
                    Output::RowsMajor,
                )?;
                Tensor::from_vec(out, (n, d), &self.device)?
            }
            _ => {
                let qkv = lin("attn.qkv", &x)?;
                // [n, 3, heads, hd] -> [3, heads, n, hd]
                let qkv = qkv
                    .reshape((n, 3, heads, head_dim))?
                    .permute((1, 2, 0, 3))?;
                let q = qkv.get(0)?.unsqueeze(0)?.contiguous()?;
                let k = qkv.get(1)?.unsqueeze(0)?.contiguous()?;
                let v = qkv.get(2)?.unsqueeze(0)?.contiguous()?;
                let q = rope(&q, rope_cs.cos, rope_cs.sin)?;
                let k = rope(&k, rope_cs.cos, rope_cs.sin)?;
                // Full attention over the image, a block of query rows at a time.
                let attn = attention_in_row_chunks(&q, &k, &v, scale, None, score_bytes)?;
                attn.squeeze(0)?.transpose(0, 1)?.reshape((n, d))?
            }
        };
        // The residual added to a product's rows as they are made, on the CPU.
        let residual = |name: &str, x: &Tensor, h: &Tensor| -> Result<Tensor> {
            if !self.device.is_cpu() {
                return Ok((h + lin(name, x)?)?);
            }
            let (y, rows, width) = with_values(h, |hv| {
                p.linear_bias_rows(
                    &format!("{pre}.{name}.weight"),
                    &format!("{pre}.{name}.bias"),
                    x,
                    |row0, ys| {
                        for (y, h) in ys.iter_mut().zip(&hv[row0 * d..]) {
                            *y += h;
                        }
                    },
                )
            })?;
            if width != d {
                return Err(RunnerError::BadRequest(format!(
                    "{pre}.{name} gives {width} values a patch, not {d}"
                )));
            }
            Ok(Tensor::from_vec(y, (rows, d), h.device())?)
        };
        let h = residual("attn.proj", &attn, h)?;
        let x = norm(&h, "norm2")?;
        // fc1 and its GELU (tanh form) on the product's rows, before they become a tensor.
        let (x, _, width) = p.linear_bias_rows(
            &format!("{pre}.mlp.linear_fc1.weight"),
            &format!("{pre}.mlp.linear_fc1.bias"),
            &x,
            |_, rows| gelu_tanh_on_this_thread(rows),
        )?;
        let x = Tensor::from_vec(x, (n, width), h.device())?;
        residual("mlp.linear_fc2", &x, &h)
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

/// The vision rotary tables, `[n, head_dim / 2]`: as tensors, and as values where the
/// blocks rotate in place (on the CPU).
struct Rope<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    values: Option<(&'a [f32], &'a [f32])>,
}

/// Candle's `rope` (the two halves of each head rotated: `x1 cos - x2 sin`,
/// `x1 sin + x2 cos`, the same f32 operations) on the queries and keys of qkv rows
/// `[rows, 3, heads, hd]` (`d = heads hd`) in place; `rows` starts at patch `row0`.
fn rope_qk_rows(rows: &mut [f32], row0: usize, d: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (r, row) in rows.chunks_exact_mut(3 * d).enumerate() {
        let (c, s) = (
            &cos[(row0 + r) * half..][..half],
            &sin[(row0 + r) * half..][..half],
        );
        for head in row[..2 * d].chunks_exact_mut(hd) {
            let (x1, x2) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (x1[i], x2[i]);
                x1[i] = a * c[i] - b * s[i];
                x2[i] = a * s[i] + b * c[i];
            }
        }
    }
}

/// [`layer_norm`]'s arithmetic (two passes: the mean, then the variance of the centred
/// values; `centred / sqrt(var + eps) * w + b`) row by row on the pool, into one new
/// tensor instead of one per step. `x: [rows, d]` on the CPU.
fn layer_norm_rows(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let w = w.flatten_all()?.to_vec1::<f32>()?;
    let b = b.flatten_all()?.to_vec1::<f32>()?;
    if w.len() != d || b.len() != d {
        return Err(RunnerError::BadRequest(format!(
            "LayerNorm of {d} values with {} weights and {} biases",
            w.len(),
            b.len()
        )));
    }
    let mut out = vec![0f32; rows * d];
    if d > 0 {
        let pool = crate::kernels::pool::global();
        let per_task = rows.div_ceil(4 * pool.threads()).max(1) * d;
        let (eps, dim) = (eps as f32, d as f32);
        with_values(x, |xs| {
            pool.for_each(
                out.chunks_mut(per_task).zip(xs.chunks(per_task)),
                |(out, xs)| {
                    for (o, x) in out.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                        let mean = x.iter().sum::<f32>() / dim;
                        for (o, x) in o.iter_mut().zip(x) {
                            *o = x - mean;
                        }
                        let var = o.iter().map(|c| c * c).sum::<f32>() / dim;
                        let inv_std = 1.0 / (var + eps).sqrt();
                        for ((o, w), b) in o.iter_mut().zip(&w).zip(&b) {
                            *o = *o * inv_std * w + b;
                        }
                    }
                },
            );
            Ok(())
        })?;
    }
    Ok(Tensor::from_vec(out, (rows, d), x.device())?)
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
    use super::*;
    use crate::kernels::test_util::Rng;

    fn tensor(rng: &mut Rng, shape: (usize, usize)) -> Tensor {
        Tensor::from_vec(rng.values(shape.0 * shape.1), shape, &Device::Cpu).unwrap()
    }

    /// The in-place rotation of the qkv rows gives candle's `rope` of the queries and keys
    /// bit for bit, whatever block of rows it is given, and leaves the values alone.
    #[test]
    fn rope_in_place_matches_candles_rope() {
        let mut rng = Rng(3);
        let (n, heads, hd) = (37, 3, 8);
        let d = heads * hd;
        let qkv = rng.values(n * 3 * d);
        let cos = tensor(&mut rng, (n, hd / 2));
        let sin = tensor(&mut rng, (n, hd / 2));
        let (cv, sv) = (
            cos.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            sin.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        let mut got = qkv.clone();
        // Uneven blocks of rows, each with its first row's index.
        let mut row0 = 0;
        for rows in [5, 1, 20, 11] {
            rope_qk_rows(
                &mut got[row0 * 3 * d..][..rows * 3 * d],
                row0,
                d,
                hd,
                &cv,
                &sv,
            );
            row0 += rows;
        }
        let t = Tensor::from_vec(qkv.clone(), (n, 3, heads, hd), &Device::Cpu).unwrap();
        let t = t.permute((1, 2, 0, 3)).unwrap();
        for part in 0..3 {
            let x = t
                .get(part)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .contiguous()
                .unwrap();
            let want = if part < 2 {
                rope(&x, &cos, &sin).unwrap()
            } else {
                x
            };
            let want = want.squeeze(0).unwrap().to_vec3::<f32>().unwrap();
            for (h, rows) in want.iter().enumerate() {
                for (i, row) in rows.iter().enumerate() {
                    let at = i * 3 * d + part * d + h * hd;
                    assert_eq!(
                        &got[at..at + hd],
                        row.as_slice(),
                        "part {part} head {h} row {i}"
                    );
                }
            }
        }
    }

    /// The row-parallel LayerNorm matches the tensor one (the same arithmetic, sums in
    /// another order) on rows of any count.
    #[test]
    fn layer_norm_rows_matches_layer_norm() {
        let mut rng = Rng(5);
        for (rows, d) in [(1, 7), (13, 64), (300, 96)] {
            let x = (tensor(&mut rng, (rows, d)) * 3.0).unwrap();
            let w = Tensor::from_vec(rng.values(d), d, &Device::Cpu).unwrap();
            let b = Tensor::from_vec(rng.values(d), d, &Device::Cpu).unwrap();
            let got = layer_norm_rows(&x, &w, &b, VISION_LN_EPS).unwrap();
            let want = layer_norm(&x, &w, &b, VISION_LN_EPS).unwrap();
            let err = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 2e-6, "{rows} x {d}: {err}");
        }
        let w = Tensor::from_vec(vec![1f32; 3], 3, &Device::Cpu).unwrap();
        assert!(layer_norm_rows(&tensor(&mut rng, (2, 4)), &w, &w, 1e-6).is_err());
    }

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
