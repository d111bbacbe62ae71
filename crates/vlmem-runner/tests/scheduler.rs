//! The continuous-batching scheduler on the bundled fixtures: requests submitted together
//! (joining the batch one prompt piece at a time) each get the ids they get alone, with
//! prompts cut in pieces and with prefixes taken from other requests' KV blocks; every
//! request ends exactly once; cancelling, a full queue, bad requests and shutdown behave as
//! documented; and no KV block is left behind.

mod common;
use common::{FIXTURES, fixture_dir, ids as ids_of};

use crossbeam_channel::{Receiver, unbounded};
use std::sync::Arc;
use std::time::Duration;
use vlmem_runner::kv::KvDtype;
use vlmem_runner::{
    Engine, FinishReason, Request, RequestImage, SamplingParams, Scheduler, SchedulerConfig,
    SeqEvent, SubmitError,
};

/// A sink that forwards every event to a channel, and the channel's receiving end.
fn channel_sink() -> (vlmem_runner::Sink, Receiver<SeqEvent>) {
    let (tx, rx) = unbounded();
    (Box::new(move |e| tx.send(e).is_ok()), rx)
}

/// Submits every request at once; their event channels, in order.
fn submit_all(scheduler: &Scheduler, requests: &[Request]) -> Vec<Receiver<SeqEvent>> {
    requests
        .iter()
        .map(|r| {
            let (sink, rx) = channel_sink();
            scheduler.submit(r, sink).unwrap();
            rx
        })
        .collect()
}

/// The ids of a request's events, and how it ended (checking the events' order: one
/// start before any id, then one end).
fn collect(rx: &Receiver<SeqEvent>) -> (Vec<u32>, vlmem_runner::Finished) {
    collect_from(rx, None)
}

/// [`collect`] of a request whose start (and maybe some ids) were read already.
fn collect_rest(rx: &Receiver<SeqEvent>) -> (Vec<u32>, vlmem_runner::Finished) {
    collect_from(rx, Some(None))
}

/// `started`: `Some(cached tokens)` when the start was read already.
fn collect_from(
    rx: &Receiver<SeqEvent>,
    started: Option<Option<usize>>,
) -> (Vec<u32>, vlmem_runner::Finished) {
    let mut ids = Vec::new();
    let mut started = started;
    loop {
        match rx.recv_timeout(Duration::from_secs(120)).expect("an event") {
            SeqEvent::Started { cached_tokens } => {
                assert!(started.is_none() && ids.is_empty(), "one start, first");
                started = Some(Some(cached_tokens));
            }
            SeqEvent::Token(id) => {
                assert!(started.is_some(), "an id before the start");
                ids.push(id);
            }
            SeqEvent::Finished(f) => {
                assert!(rx.try_recv().is_err(), "nothing follows the end");
                if let Some(seen) = started {
                    if let Some(cached) = seen {
                        assert_eq!(f.cached_tokens, cached);
                    }
                } else {
                    assert!(f.cancelled, "ended without a start: {f:?}");
                }
                return (ids, f);
            }
            SeqEvent::Failed(e) => panic!("failed: {e}"),
        }
    }
}

/// The next event that is not the start.
fn next_past_start(rx: &Receiver<SeqEvent>) -> SeqEvent {
    loop {
        match rx.recv().unwrap() {
            SeqEvent::Started { .. } => continue,
            e => return e,
        }
    }
}

fn engine(fixture: &str) -> Arc<Engine> {
    Arc::new(
        Engine::builder(fixture_dir(fixture))
            .kv_dtype(KvDtype::F32)
            .build()
            .unwrap(),
    )
}

/// Text ids below the vision tokens, `n` of them from `seed`.
fn text_ids(engine: &Engine, n: usize, seed: u32) -> Vec<u32> {
    let cfg = engine.runner().model().config();
    let bound = cfg
        .text
        .vocab_size
        .min(cfg.image_token_id as u64)
        .min(cfg.vision_start_token_id as u64) as u32;
    let mut x = seed.wrapping_mul(0x9E37_79B9) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x % bound
        })
        .collect()
}

fn greedy(r: Request, new_tokens: usize) -> Request {
    r.max_new_tokens(new_tokens)
        .sampling(SamplingParams::greedy())
}

/// Live blocks in the engine's paged KV pool (every fixture's engine has one).
fn kv_blocks(engine: &Engine) -> u64 {
    engine.kv_pool().expect("a paged KV pool").stats().blocks
}

#[test]
fn batched_requests_each_get_their_ids_alone() {
    for fixture in FIXTURES {
        let engine = engine(fixture);
        let dir = fixture_dir(fixture);
        let image_prompt = ids_of(&common::reference(&dir)["input_ids"]);
        let requests: Vec<Request> = (0..8)
            .map(|i| {
                let r = if i % 3 == 0 {
                    Request::ids(image_prompt.clone())
                        .image(RequestImage::Path(dir.join("image0.png")))
                } else {
                    Request::ids(text_ids(&engine, 1 + 3 * i, i as u32 + 1))
                };
                greedy(r, 4 + i)
            })
            .collect();
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| engine.generate(r, &mut |_| {}).unwrap().ids)
            .collect();
        let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::default());
        let receivers: Vec<_> = requests
            .iter()
            .map(|r| {
                let (sink, rx) = channel_sink();
                let ticket = scheduler.submit(r, sink).unwrap();
                assert!(ticket.prompt_tokens() > 0);
                rx
            })
            .collect();
        for (i, (rx, want)) in receivers.iter().zip(&alone).enumerate() {
            let (ids, f) = collect(rx);
            assert_eq!(&ids, want, "{fixture}: request {i}");
            assert_eq!(f.generated_tokens, ids.len());
            assert!(!f.cancelled);
            let stopped = f.finish_reason == FinishReason::Stop;
            assert_eq!(stopped, ids.len() < 4 + i, "{fixture}: request {i}: {f:?}");
        }
        let stats = scheduler.stats();
        assert_eq!(stats.completed, 8);
        assert_eq!((stats.running, stats.queued, stats.rejected), (0, 0, 0));
        assert!(stats.max_batch > 1, "{fixture}: never batched: {stats:?}");
        assert_eq!(
            stats.generated_tokens,
            alone.iter().map(|a| a.len() as u64).sum::<u64>()
        );
        scheduler.shutdown(Duration::from_secs(1));
        assert_eq!(kv_blocks(&engine), 0, "{fixture}: KV blocks left");
    }
}

#[test]
fn a_cancelled_request_ends_once_and_frees_its_blocks() {
    let engine = engine(FIXTURES[0]);
    let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::default());
    // A sink that stops after three ids (a client that went away).
    let (tx, rx) = unbounded();
    let mut seen = 0;
    let sink: vlmem_runner::Sink = Box::new(move |e| {
        if matches!(e, SeqEvent::Token(_)) {
            seen += 1;
        }
        let _ = tx.send(e);
        seen < 3
    });
    scheduler
        .submit(&greedy(Request::ids(text_ids(&engine, 6, 9)), 500), sink)
        .unwrap();
    let (ids, f) = collect(&rx);
    assert_eq!(ids.len(), 3);
    assert!(f.cancelled);
    // A ticket cancels as well, while the request runs.
    let (sink, rx) = channel_sink();
    let ticket = scheduler
        .submit(&greedy(Request::ids(text_ids(&engine, 6, 10)), 500), sink)
        .unwrap();
    assert!(matches!(next_past_start(&rx), SeqEvent::Token(_)));
    ticket.cancel();
    let (ids, f) = collect_rest(&rx);
    assert!(f.cancelled && ids.len() < 499, "{f:?}");
    assert_eq!(scheduler.stats().completed, 2);
    scheduler.shutdown(Duration::ZERO);
    assert_eq!(kv_blocks(&engine), 0);
}

#[test]
fn a_full_queue_refuses_and_bad_requests_are_refused_at_once() {
    let engine = engine(FIXTURES[0]);
    let scheduler = Scheduler::start(
        engine.clone(),
        SchedulerConfig {
            max_seqs: 1,
            max_queue: 1,
            ..SchedulerConfig::default()
        },
    );
    let long = greedy(Request::ids(text_ids(&engine, 4, 1)), 400);
    let (sink_a, rx_a) = channel_sink();
    let a = scheduler.submit(&long, sink_a).unwrap();
    // A runs once its first id arrives; B then waits in the one queue slot.
    assert!(matches!(next_past_start(&rx_a), SeqEvent::Token(_)));
    let (sink_b, rx_b) = channel_sink();
    scheduler.submit(&long, sink_b).unwrap();
    let (sink_c, _rx_c) = channel_sink();
    match scheduler.submit(&long, sink_c) {
        Err(SubmitError::QueueFull { queued: 1 }) => {}
        other => panic!("expected a full queue, got {other:?}"),
    }
    assert_eq!(scheduler.stats().rejected, 1);
    // An id outside the vocabulary and impossible sampling are refused before queueing.
    let vocab = engine.runner().model().config().text.vocab_size as u32;
    let (sink, _rx) = channel_sink();
    assert!(matches!(
        scheduler.submit(&Request::ids(vec![vocab + 5]), sink),
        Err(SubmitError::Refused(_))
    ));
    let bad = Request::ids(vec![1, 2]).sampling(SamplingParams {
        temperature: -1.0,
        ..SamplingParams::greedy()
    });
    let (sink, _rx) = channel_sink();
    assert!(matches!(
        scheduler.submit(&bad, sink),
        Err(SubmitError::Refused(_))
    ));
    a.cancel();
    let (_, fa) = collect_rest(&rx_a);
    assert!(fa.cancelled);
    // B starts once A's slot frees.
    assert!(matches!(next_past_start(&rx_b), SeqEvent::Token(_)));
    // Shutdown with no grace cancels B, then refuses new requests.
    scheduler.shutdown(Duration::ZERO);
    let (_, fb) = collect_rest(&rx_b);
    assert!(fb.cancelled);
    let (sink, _rx) = channel_sink();
    assert!(matches!(
        scheduler.submit(&long, sink),
        Err(SubmitError::ShuttingDown)
    ));
    assert_eq!(kv_blocks(&engine), 0);
}

#[test]
fn shutdown_lets_running_requests_finish_within_the_grace() {
    let engine = engine(FIXTURES[0]);
    let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::default());
    let receivers: Vec<_> = (0..3)
        .map(|i| {
            let (sink, rx) = channel_sink();
            scheduler
                .submit(&greedy(Request::ids(text_ids(&engine, 3, i)), 5), sink)
                .unwrap();
            rx
        })
        .collect();
    scheduler.shutdown(Duration::from_secs(60));
    for rx in &receivers {
        let (ids, f) = collect(rx);
        assert!(!f.cancelled, "{f:?}");
        assert!(!ids.is_empty());
    }
    assert_eq!(kv_blocks(&engine), 0);
}

/// `cancel_all` while nothing runs does not cancel a request submitted afterwards.
#[test]
fn cancelling_an_idle_scheduler_spares_later_requests() {
    let engine = engine(FIXTURES[0]);
    let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::default());
    scheduler.cancel_all();
    std::thread::sleep(Duration::from_millis(50));
    let (sink, rx) = channel_sink();
    scheduler
        .submit(&greedy(Request::ids(text_ids(&engine, 4, 2)), 3), sink)
        .unwrap();
    let (ids, f) = collect(&rx);
    assert!(!f.cancelled && !ids.is_empty(), "{f:?}");
    scheduler.close();
    assert!(scheduler.join(Duration::from_secs(60)));
}

/// Eight threads submit, cancel and drop requests at once against a small queue: the
/// ledger holds. Every accepted request ends exactly once (a second end would show as an
/// event after the end), refusals are counted, nothing is left running or queued, and no KV
/// block is left.
#[test]
fn concurrent_clients_keep_the_ledger() {
    let engine = engine(FIXTURES[2]);
    let scheduler = Arc::new(Scheduler::start(
        engine.clone(),
        SchedulerConfig {
            max_seqs: 4,
            max_queue: 6,
            ..SchedulerConfig::default()
        },
    ));
    let threads: Vec<_> = (0..8u32)
        .map(|t| {
            let scheduler = scheduler.clone();
            let engine = engine.clone();
            std::thread::spawn(move || {
                let (mut accepted, mut refused, mut ended) = (0u64, 0u64, 0u64);
                let mut pending = Vec::new();
                for i in 0..12u32 {
                    let r = greedy(
                        Request::ids(text_ids(&engine, 1 + (i % 5) as usize, t * 100 + i)),
                        2 + (i % 7) as usize,
                    );
                    let (sink, rx) = channel_sink();
                    match scheduler.submit(&r, sink) {
                        Ok(ticket) => {
                            accepted += 1;
                            if i % 4 == 3 {
                                ticket.cancel();
                            }
                            pending.push(rx);
                        }
                        Err(SubmitError::QueueFull { .. }) => refused += 1,
                        Err(e) => panic!("{e}"),
                    }
                    if i % 3 == 2 {
                        for rx in pending.drain(..) {
                            collect(&rx);
                            ended += 1;
                        }
                    }
                }
                for rx in pending.drain(..) {
                    collect(&rx);
                    ended += 1;
                }
                (accepted, refused, ended)
            })
        })
        .collect();
    let (mut accepted, mut refused, mut ended) = (0, 0, 0);
    for t in threads {
        let (a, r, e) = t.join().unwrap();
        accepted += a;
        refused += r;
        ended += e;
    }
    assert_eq!(accepted + refused, 96);
    assert_eq!(ended, accepted);
    let stats = scheduler.stats();
    assert_eq!(stats.completed, accepted, "{stats:?}");
    assert_eq!(stats.rejected, refused, "{stats:?}");
    assert_eq!((stats.running, stats.queued), (0, 0), "{stats:?}");
    assert!(stats.max_batch <= 4, "{stats:?}");
    scheduler.shutdown(Duration::from_secs(10));
    assert_eq!(kv_blocks(&engine), 0);
}

/// Prompts run in pieces of 3 tokens (an image's pads never end a piece but at its end)
/// get the ids they get whole, alone.
#[test]
fn prompts_in_pieces_get_their_ids_alone() {
    for fixture in FIXTURES {
        let engine = engine(fixture);
        let dir = fixture_dir(fixture);
        let image_prompt = ids_of(&common::reference(&dir)["input_ids"]);
        let with_image = || {
            greedy(
                Request::ids(image_prompt.clone())
                    .image(RequestImage::Path(dir.join("image0.png"))),
                5,
            )
        };
        let requests = [
            with_image(),
            greedy(Request::ids(text_ids(&engine, 20, 3)), 5),
            greedy(Request::ids(text_ids(&engine, 7, 4)), 5),
            with_image(),
        ];
        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| engine.generate(r, &mut |_| {}).unwrap().ids)
            .collect();
        let scheduler = Scheduler::start(
            engine.clone(),
            SchedulerConfig {
                prefill_chunk_tokens: 3,
                kept_prompts: 0,
                ..SchedulerConfig::default()
            },
        );
        let receivers = submit_all(&scheduler, &requests);
        for (i, (rx, want)) in receivers.iter().zip(&alone).enumerate() {
            let (ids, _) = collect(rx);
            assert_eq!(&ids, want, "{fixture}: request {i}");
        }
        let stats = scheduler.stats();
        // 20 and 7 text tokens alone take 7 and 3 pieces.
        assert!(stats.prefill_chunks >= 12, "{fixture}: {stats:?}");
        scheduler.shutdown(Duration::from_secs(1));
        assert_eq!(kv_blocks(&engine), 0, "{fixture}: KV blocks left");
    }
}

/// `image0.png` with its pixels changed.
fn other_image(dir: &std::path::Path) -> image::RgbImage {
    let mut img = image::open(dir.join("image0.png")).unwrap().to_rgb8();
    for p in img.pixels_mut() {
        p.0 = [255 - p.0[0], p.0[2], p.0[1]];
    }
    img
}

/// A prompt that starts like a running or finished request's prompt takes those whole KV
/// blocks from the pool instead of computing them (and says how many tokens), and gets the
/// ids it gets alone; a prompt whose image differs shares nothing from that image on.
#[test]
fn a_repeated_prefix_is_taken_from_the_pool() {
    for fixture in FIXTURES {
        let engine = engine(fixture);
        let dir = fixture_dir(fixture);
        let block = vlmem_runner::engine::KV_BLOCK_TOKENS as usize;
        let a = text_ids(&engine, 40, 7);
        let mut b = a[..36].to_vec();
        b.extend(text_ids(&engine, 10, 8));
        let image_prompt = ids_of(&common::reference(&dir)["input_ids"]);
        let pad = engine.runner().model().config().image_token_id;
        let first_pad = image_prompt.iter().position(|&i| i == pad).unwrap();
        let image = |img: RequestImage| greedy(Request::ids(image_prompt.clone()).image(img), 5);
        let with_image0 = || image(RequestImage::Path(dir.join("image0.png")));
        // (request, prompt tokens it should find in the pool)
        let plan = [
            (greedy(Request::ids(a.clone()), 5), 0),
            (greedy(Request::ids(a.clone()), 5), 32),
            (greedy(Request::ids(b), 5), 32),
            (with_image0(), 0),
            (with_image0(), (image_prompt.len() - 1) / block * block),
            (
                image(RequestImage::Rgb(other_image(&dir))),
                first_pad / block * block,
            ),
        ];
        let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::default());
        let mut cached_sum = 0;
        for (i, (r, cached)) in plan.iter().enumerate() {
            let alone = engine.generate(r, &mut |_| {}).unwrap().ids;
            let (sink, rx) = channel_sink();
            scheduler.submit(r, sink).unwrap();
            let (ids, f) = collect(&rx);
            assert_eq!(ids, alone, "{fixture}: request {i}");
            assert_eq!(f.cached_tokens, *cached, "{fixture}: request {i}");
            cached_sum += cached;
        }
        // Three copies at once: the first computes, the next two take its blocks.
        let c = text_ids(&engine, 2 * block + 3, 11);
        let r = greedy(Request::ids(c.clone()), 4);
        let alone = engine.generate(&r, &mut |_| {}).unwrap().ids;
        let receivers: Vec<_> = (0..3)
            .map(|_| {
                let (sink, rx) = channel_sink();
                scheduler.submit(&r, sink).unwrap();
                rx
            })
            .collect();
        let cached: Vec<usize> = receivers
            .iter()
            .map(|rx| {
                let (ids, f) = collect(rx);
                assert_eq!(ids, alone, "{fixture}");
                f.cached_tokens
            })
            .collect();
        assert_eq!(cached, [0, 2 * block, 2 * block], "{fixture}");
        cached_sum += 4 * block;
        let stats = scheduler.stats();
        assert_eq!(
            stats.cached_tokens, cached_sum as u64,
            "{fixture}: {stats:?}"
        );
        scheduler.shutdown(Duration::from_secs(1));
        assert_eq!(kv_blocks(&engine), 0, "{fixture}: KV blocks left");
    }
}

/// With no prompts kept, a finished request's blocks return at once and a later request
/// with the same prompt computes it again.
#[test]
fn with_no_kept_prompts_a_finished_request_leaves_nothing() {
    let engine = engine(FIXTURES[0]);
    let scheduler = Scheduler::start(
        engine.clone(),
        SchedulerConfig {
            kept_prompts: 0,
            ..SchedulerConfig::default()
        },
    );
    let r = greedy(Request::ids(text_ids(&engine, 40, 5)), 3);
    for _ in 0..2 {
        let (sink, rx) = channel_sink();
        scheduler.submit(&r, sink).unwrap();
        let (_, f) = collect(&rx);
        assert_eq!(f.cached_tokens, 0);
        assert_eq!(kv_blocks(&engine), 0);
    }
    assert_eq!(scheduler.stats().kept_prompts, 0);
}

/// An engine whose host KV room holds the prompts of two of these long requests but not
/// their growth: the newest is set aside (its KV swapped to the disk tier) as they grow, and
/// resumed when the other ends; each still gets the ids it gets alone, and no block is left.
#[test]
fn sequences_set_aside_for_room_resume_unchanged() {
    let engine = Arc::new(
        Engine::builder(fixture_dir(FIXTURES[0]))
            .kv_dtype(KvDtype::F32)
            // The host's KV budget: one 1024-token context, a whole MiB.
            .max_context_tokens(1024)
            .build()
            .unwrap(),
    );
    let pool = engine.kv_pool().expect("a paged KV pool");
    let layers = engine.runner().model().config().text.num_hidden_layers;
    let block = u64::from(pool.config().block_tokens);
    let (prompt_tokens, new_tokens) = (1000u64, 40u64);
    let blocks = |tokens: u64| tokens.div_ceil(block) * layers;
    let room = pool.max_resident_blocks();
    assert!(
        2 * blocks(prompt_tokens + 1) <= room && 2 * blocks(prompt_tokens + new_tokens) > room,
        "the room ({room} blocks) should hold two prompts but not their growth"
    );
    let requests: Vec<Request> = (0..4)
        .map(|i| {
            greedy(
                Request::ids(text_ids(&engine, prompt_tokens as usize, 20 + i)),
                new_tokens as usize,
            )
        })
        .collect();
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| engine.generate(r, &mut |_| {}).unwrap().ids)
        .collect();
    let scheduler = Scheduler::start(
        engine.clone(),
        SchedulerConfig {
            kept_prompts: 0,
            ..SchedulerConfig::default()
        },
    );
    let receivers = submit_all(&scheduler, &requests);
    for (i, (rx, want)) in receivers.iter().zip(&alone).enumerate() {
        let (ids, f) = collect(rx);
        assert_eq!(&ids, want, "request {i}");
        assert!(!f.cancelled);
    }
    let stats = scheduler.stats();
    assert!(stats.preemptions > 0, "never set aside: {stats:?}");
    assert_eq!(stats.preempted, 0, "{stats:?}");
    assert_eq!(stats.completed, 4);
    let kv = pool.stats();
    assert!(kv.swap_outs > 0, "{kv:?}");
    scheduler.shutdown(Duration::from_secs(1));
    assert_eq!(kv_blocks(&engine), 0);
    pool.check().unwrap();
}

/// A sink that says no to the start cancels its request before any prompt pass: it ends
/// once, cancelled, with no id, and nothing was computed for it.
#[test]
fn a_sink_that_refuses_the_start_cancels_before_the_prompt_pass() {
    let engine = engine(FIXTURES[0]);
    let scheduler = Scheduler::start(engine.clone(), SchedulerConfig::default());
    let (tx, rx) = unbounded();
    let sink: vlmem_runner::Sink = Box::new(move |e| {
        let started = matches!(e, SeqEvent::Started { .. });
        let _ = tx.send(e);
        !started
    });
    scheduler
        .submit(&greedy(Request::ids(text_ids(&engine, 40, 3)), 5), sink)
        .unwrap();
    let (ids, f) = collect(&rx);
    assert!(ids.is_empty() && f.cancelled, "{f:?}");
    let stats = scheduler.stats();
    assert_eq!((stats.prompt_tokens, stats.completed), (0, 1), "{stats:?}");
    scheduler.shutdown(Duration::from_secs(1));
    assert_eq!(kv_blocks(&engine), 0);
}
