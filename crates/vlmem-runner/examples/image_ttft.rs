//! Times one image request's time to the first token on a checkpoint, as `vlmem bench e2e`
//! times `ttft_s.image_{side}`: the same test image (smooth gradients with a pattern), the
//! same prompt (4 ids, the image's pads, 12 ids), one greedy token, an engine with no GPU
//! and every weight resident in host RAM; the figure is preparation plus time to the first
//! token. A fresh engine per repetition (the engine's vision cache would answer a second
//! request for the same image), so each figure includes bringing the weights into RAM on
//! first use, as the bench's does; with `warm`, each engine first answers the same request
//! with another image of the same size, and the figure is the second request's (the
//! weights resident, the vision tower run again): compute alone.
//!
//! `cargo run --release -p vlmem-runner --example image_ttft -- CHECKPOINT_DIR [side] [reps]
//! [warm]` (the bench's q8_0 copy: `~/.cache/vlmem/quantized/qwen3-vl-2b-synth-q8_0-*`).

use std::path::PathBuf;
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::preprocess::preprocess;
use vlmem_runner::{Engine, PreprocessConfig, Request, RequestImage, SamplingParams};

/// The bench's test image (`flip`: the same pattern mirrored, another image of its size).
fn test_image(side: u32, flip: bool) -> image::RgbImage {
    image::RgbImage::from_fn(side, side, |x, y| {
        let x = if flip { side - 1 - x } else { x };
        let v = ((x ^ y) & 0x3f) as u8;
        image::Rgb([
            (x * 255 / side) as u8,
            (y * 255 / side) as u8,
            v.wrapping_mul(4),
        ])
    })
}

/// The bench's prompt ids: `n` ids spread over the vocabulary below its special tokens.
fn spread_ids(c: &Checkpoint, n: usize) -> Vec<u32> {
    let cfg = &c.config;
    let below = cfg
        .image_token_id
        .min(cfg.vision_start_token_id)
        .min(c.config.text.vocab_size as u32)
        .max(2);
    let mut x = 0x9E37_79B9u32;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % below
        })
        .collect()
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(
        args.next()
            .expect("usage: image_ttft CHECKPOINT_DIR [side] [reps]"),
    );
    let side: u32 = args.next().map_or(1024, |a| a.parse().expect("side"));
    let reps: usize = args.next().map_or(1, |a| a.parse().expect("reps"));
    let warm = args.next().as_deref() == Some("warm");
    let c = Checkpoint::open(&dir).expect("checkpoint");
    let cfg = &c.config;
    let image = test_image(side, false);
    let pads = preprocess(&image, &PreprocessConfig::for_vision(&cfg.vision))
        .expect("preprocess")
        .num_tokens(cfg.vision.spatial_merge_size as usize);
    let mut ids = spread_ids(&c, 4);
    ids.push(cfg.vision_start_token_id);
    ids.extend(std::iter::repeat_n(cfg.image_token_id, pads));
    ids.push(cfg.vision_end_token_id);
    ids.extend(spread_ids(&c, 12));
    let request = |image| {
        Request::ids(ids.clone())
            .image(RequestImage::Rgb(image))
            .max_new_tokens(1)
            .sampling(SamplingParams::greedy())
    };
    let (first, request) = (request(test_image(side, true)), request(image));
    // Every weight resident: the weights' bytes and room for the engine's other classes.
    let host = c.total_bytes() + (1 << 30);
    println!(
        "{} image tokens, {} threads, kernels {}, attention {}",
        pads,
        vlmem_runner::kernels::pool::global().threads(),
        vlmem_runner::kernels::isa(),
        vlmem_runner::kernels::attention::Isa::best().name()
    );
    for _ in 0..reps {
        let (engine, prepared) = Engine::builder(&dir)
            .gpu_mem(0)
            .host_mem(host)
            .prefetch_layers(2)
            .build_for(&request)
            .expect("engine");
        if warm {
            let reply = engine.generate(&first, &mut |_| {}).expect("generate");
            let t = &reply.timings;
            println!(
                "first request (another image): {:.3} s",
                (t.prepare + t.time_to_first_token).as_secs_f64()
            );
        }
        let reply = engine.generate(&prepared, &mut |_| {}).expect("generate");
        let t = &reply.timings;
        println!(
            "ttft_s.image_{side}{} {:.3} (prepare {:.3}, time to first token {:.3}), first token {:?}",
            if warm { " (warm)" } else { "" },
            (t.prepare + t.time_to_first_token).as_secs_f64(),
            t.prepare.as_secs_f64(),
            t.time_to_first_token.as_secs_f64(),
            reply.ids.first()
        );
    }
}
