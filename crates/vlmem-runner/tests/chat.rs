//! Conversations: a later turn prefills only the tokens its KV cache does not hold and gives
//! exactly what the whole conversation sent as one fresh request gives (ids, and logits
//! within 1e-4), with images in earlier turns (whose M-RoPE positions are not token counts),
//! in the paged pool and with every weight streamed; a cache whose tail the re-rendered
//! conversation no longer starts with drops that tail; a reply stopped by the caller ends
//! there and the conversation goes on.

mod common;
use common::{fixture_dir, max_abs};

use std::path::{Path, PathBuf};
use vlmem_core::profile::HardwareProfile;
use vlmem_runner::engine::{Conversation, Turn};
use vlmem_runner::{Engine, Message, Prompt, Reply, Request, RequestImage, SamplingParams};

/// The laptop's profile: the same tiers on every machine.
fn laptop() -> HardwareProfile {
    HardwareProfile::resolve("laptop-i5-10210u-mx250").unwrap()
}

/// The tiny fixture with ample budgets (the KV cache in the paged pool), or (`streamed`) no
/// RAM and no GPU: every weight streams from disk and the KV cache is in process.
fn engine(streamed: bool, swap: &Path) -> Engine {
    let mut b = Engine::builder(fixture_dir("qwen3-vl-tiny"))
        .profile(laptop())
        .disk_path(swap);
    if streamed {
        b = b.gpu_mem(0).host_mem(0);
    }
    b.build().unwrap()
}

fn image() -> PathBuf {
    fixture_dir("qwen3-vl-tiny").join("image0.png")
}

/// A greedy turn of `text` generating at most `n` tokens.
fn turn(text: &str, n: usize) -> Turn {
    Turn::text(text)
        .max_new_tokens(n)
        .sampling(SamplingParams::greedy())
}

fn send(conv: &mut Conversation<'_>, turn: &Turn) -> Reply {
    conv.send(turn, &mut |_| true).unwrap()
}

/// The last turn of `conv` sent again as one fresh request: the conversation before its
/// last reply, every image of it.
fn fresh(engine: &Engine, conv: &Conversation<'_>, images: &[PathBuf], n: usize) -> Reply {
    let messages = conv.messages();
    let before_reply: Vec<Message> = messages[..messages.len() - 1].to_vec();
    let mut request = Request::new(Prompt::Messages(before_reply))
        .max_new_tokens(n)
        .sampling(SamplingParams::greedy());
    request.images = images.iter().cloned().map(RequestImage::Path).collect();
    engine.generate(&request, &mut |_| {}).unwrap()
}

/// The reply a conversation turn gave equals the fresh request's: prompt, ids, logits.
fn assert_same(turn: &Reply, fresh: &Reply, what: &str) {
    assert_eq!(turn.prompt_ids, fresh.prompt_ids, "{what}: prompt");
    assert_eq!(turn.ids, fresh.ids, "{what}: ids");
    let err = max_abs(
        &turn.generated_logits.concat(),
        &fresh.generated_logits.concat(),
    );
    assert!(err < 1e-4, "{what}: logits differ by {err}");
}

/// The longest common prefix of what the cache held and the new prompt (at least the last
/// prompt token is left to prefill).
fn common_prefix(cached: &[u32], prompt: &[u32]) -> usize {
    cached
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len() - 1)
}

#[test]
fn a_later_turn_prefills_only_its_new_tokens_and_equals_a_fresh_request() {
    for streamed in [false, true] {
        for first_image in [false, true] {
            let what = format!("streamed={streamed} image in the first turn={first_image}");
            let swap = tempfile::tempdir().unwrap();
            let engine = engine(streamed, swap.path());
            assert_eq!(engine.kv_pool().is_none(), streamed, "{what}");
            let mut conv = engine.conversation().unwrap();
            let mut images = Vec::new();
            let mut first = turn("Tell me about the weather.", 6);
            if first_image {
                first = first.image(image());
                images.push(image());
            }
            let r1 = send(&mut conv, &first);
            assert_eq!(r1.stats.prefilled_tokens, r1.prompt_ids.len(), "{what}");
            assert_eq!(r1.stats.reused_tokens, 0, "{what}");
            assert_same(&r1, &fresh(&engine, &conv, &images, 6), &what);
            // The cache holds the prompt and the reply's ids but the last (never fed back).
            let mut cached = r1.prompt_ids.clone();
            cached.extend(&r1.ids[..r1.ids.len() - 1]);
            assert_eq!(conv.cached_ids(), &cached[..], "{what}");
            if first_image {
                assert!(
                    conv.next_position() < cached.len() as i64,
                    "{what}: after an image the next position is not the token count"
                );
            }

            let r2 = send(&mut conv, &turn("And tomorrow?", 6));
            let total = r2.prompt_ids.len();
            let reused = common_prefix(&cached, &r2.prompt_ids);
            assert!(
                reused >= r1.prompt_ids.len(),
                "{what}: the whole first prompt is reused"
            );
            assert_eq!(r2.stats.reused_tokens, reused, "{what}");
            assert_eq!(r2.stats.prefilled_tokens, total - reused, "{what}");
            assert_eq!(r2.stats.dropped_tokens, cached.len() - reused, "{what}");
            assert_eq!(r2.stats.kv_reuse_fallback, None, "{what}");
            assert_same(&r2, &fresh(&engine, &conv, &images, 6), &what);

            // A third turn with an image of its own, after an image and two replies.
            images.push(image());
            let mut cached = r2.prompt_ids.clone();
            cached.extend(&r2.ids[..r2.ids.len() - 1]);
            let r3 = send(
                &mut conv,
                &turn("What is in this picture?", 5).image(image()),
            );
            let reused = common_prefix(&cached, &r3.prompt_ids);
            assert!(reused >= r2.prompt_ids.len(), "{what}");
            assert_eq!(r3.stats.reused_tokens, reused, "{what}");
            assert_eq!(r3.stats.prefilled_tokens, r3.prompt_ids.len() - reused);
            assert_same(&r3, &fresh(&engine, &conv, &images, 5), &what);

            drop(conv);
            if let Some(pool) = engine.kv_pool() {
                let s = pool.stats();
                assert_eq!((s.sequences, s.blocks), (0, 0), "{what}: freed on drop");
            }
        }
    }
}

/// A reply the template renders back to exactly the generated ids (here: the reply is its
/// stop id alone, rendered as the end of the assistant's turn) is reused whole: the second
/// turn prefills nothing of the first turn's prompt or reply.
#[test]
fn a_reply_the_template_renders_back_is_reused_whole() {
    let swap = tempfile::tempdir().unwrap();
    let engine = engine(false, swap.path());
    let mut conv = engine.conversation().unwrap();
    // Any first id ends the reply: it is the whole reply, and it is never fed back.
    let mut first = turn("Hello there.", 4).image(image());
    first.stop_ids = (0..1024).collect();
    let r1 = send(&mut conv, &first);
    assert_eq!(r1.ids.len(), 1);
    let r2 = send(&mut conv, &turn("Go on.", 4));
    assert_eq!(
        r2.stats.reused_tokens,
        r1.prompt_ids.len() + r1.ids.len() - 1
    );
    assert_eq!(
        r2.stats.prefilled_tokens,
        r2.prompt_ids.len() - r2.stats.reused_tokens
    );
    assert_eq!(r2.stats.dropped_tokens, 0);
    assert_same(&r2, &fresh(&engine, &conv, &[image()], 4), "whole reuse");
}

/// A change early in the conversation (the system message) leaves only the tokens before
/// it reusable: the cache drops the rest, taking whole pool blocks by reference, and the
/// turn still equals a fresh request, in the pool and in process.
#[test]
fn a_changed_system_message_drops_the_cache_after_it_and_still_equals_a_fresh_request() {
    for streamed in [false, true] {
        let swap = tempfile::tempdir().unwrap();
        let engine = engine(streamed, swap.path());
        let mut conv = engine.conversation().unwrap();
        let long = "You answer questions about the weather in a few short words, and you \
                    always say where the forecast comes from";
        conv.set_system(Some(format!("{long}, politely.")));
        let r1 = send(&mut conv, &turn("Is it sunny?", 5).image(image()));
        let cached_len = conv.cached_ids().len();
        conv.set_system(Some(format!("{long}, bluntly.")));
        let r2 = send(&mut conv, &turn("And tomorrow?", 5));
        let reused = common_prefix(&r1.prompt_ids, &r2.prompt_ids);
        assert!(
            reused > 16 && reused < r1.prompt_ids.len(),
            "the system message differs near its end: {reused}"
        );
        assert_eq!(r2.stats.reused_tokens, reused);
        assert_eq!(r2.stats.dropped_tokens, cached_len - reused);
        assert_eq!(r2.stats.prefilled_tokens, r2.prompt_ids.len() - reused);
        assert_same(
            &r2,
            &fresh(&engine, &conv, &[image()], 5),
            &format!("streamed={streamed}"),
        );
    }
}

/// `on_token` returning false ends the reply at that id; the conversation keeps what was
/// said and its next turn equals a fresh request.
#[test]
fn a_reply_stopped_by_the_caller_ends_there_and_the_conversation_goes_on() {
    let swap = tempfile::tempdir().unwrap();
    let engine = engine(false, swap.path());
    let mut conv = engine.conversation().unwrap();
    let mut seen = 0;
    let r1 = conv
        .send(&turn("Tell me a long story.", 12), &mut |_| {
            seen += 1;
            seen < 2
        })
        .unwrap();
    assert!(r1.cancelled);
    assert_eq!(r1.ids.len(), 2);
    assert_eq!(
        conv.messages().len(),
        2,
        "the user's turn and the partial reply"
    );
    let r2 = send(&mut conv, &turn("Shorter, please.", 4));
    assert!(!r2.cancelled);
    assert!(r2.stats.reused_tokens >= r1.prompt_ids.len());
    assert_same(&r2, &fresh(&engine, &conv, &[], 4), "after a stop");
}

/// A turn that cannot run (its image is missing) is refused and leaves the conversation and
/// its cache as they were.
#[test]
fn a_failed_turn_leaves_the_conversation_as_it_was() {
    let swap = tempfile::tempdir().unwrap();
    let engine = engine(false, swap.path());
    let mut conv = engine.conversation().unwrap();
    let r1 = send(&mut conv, &turn("Hi.", 3));
    let (messages, cached) = (conv.messages().to_vec(), conv.cached_ids().to_vec());
    let bad = turn("Look.", 3).image(PathBuf::from("/nonexistent/picture.png"));
    assert!(conv.send(&bad, &mut |_| true).is_err());
    let mut two_images = turn("Look.", 3).image(image());
    two_images.images.push(RequestImage::Path(image()));
    assert!(conv.send(&two_images, &mut |_| true).is_err());
    assert_eq!(conv.messages(), &messages[..]);
    assert_eq!(conv.cached_ids(), &cached[..]);
    let r2 = send(&mut conv, &turn("Again.", 3));
    assert!(r2.stats.reused_tokens >= r1.prompt_ids.len());
    assert_same(&r2, &fresh(&engine, &conv, &[], 3), "after a failed turn");
}
