//! The engine, as a program uses it: every bundled fixture through [`Engine::generate`] gives
//! the reference's greedy ids and logits whatever the tiering; two threads on one engine each
//! get exactly what each gets alone, also while every weight streams from disk; a request
//! whose KV cache fits nowhere is refused before any work; bad folders and requests are typed
//! errors.

mod common;
use common::{FIXTURES, fixture_dir, flat, ids, max_abs, reference};

use std::path::Path;
use std::sync::{Arc, Barrier};
use vlmem::{TensorKind, Tier};
use vlmem_core::bytes::MIB;
use vlmem_core::profile::HardwareProfile;
use vlmem_runner::kv::KvDtype;
use vlmem_runner::{
    Activations, Engine, EngineError, FinishReason, Message, Part, Prompt, Reply, Request,
    RequestImage, SamplingParams,
};

/// The laptop's profile: the same tiers on every machine.
fn laptop() -> HardwareProfile {
    HardwareProfile::resolve("laptop-i5-10210u-mx250").unwrap()
}

/// An engine for fixture folder `dir` with ample budgets, or (`streamed`) no RAM and no GPU
/// for weights: every weight streams from the checkpoint on disk.
fn engine(dir: &Path, streamed: bool, swap: &Path) -> Engine {
    engine_with_host(dir, streamed.then_some(0), swap)
}

/// An engine for `dir` with no GPU and `host_bytes` of RAM (`None`: the profile's), its KV
/// cache exact (f32): the reference's bound holds for it.
fn engine_with_host(dir: &Path, host_bytes: Option<u64>, swap: &Path) -> Engine {
    let mut b = Engine::builder(dir)
        .profile(laptop())
        .disk_path(swap)
        .kv_dtype(KvDtype::F32);
    if let Some(bytes) = host_bytes {
        b = b.gpu_mem(0).host_mem(bytes);
    }
    b.build().unwrap()
}

/// RAM whose weight budget holds part of a fixture's weights: after one step's activations
/// (1 MiB) and the KV cache (1 MiB, at most half of the host), 1 MiB of weights, which holds
/// the decoder and part of the vision tower.
const PART_HOST_BYTES: u64 = 3 * MIB;

/// The reference prompt (ids as the reference received them) with the fixture's image.
fn reference_request(dir: &Path, max_new_tokens: usize) -> Request {
    let r = reference(dir);
    Request::ids(ids(&r["input_ids"]))
        .image(dir.join("image0.png"))
        .max_new_tokens(max_new_tokens)
}

/// A text-only chat prompt.
fn text_request() -> Request {
    Request::text("Tell me about the weather.").max_new_tokens(8)
}

fn generate(engine: &Engine, request: &Request) -> Reply {
    engine.generate(request, &mut |_| {}).unwrap()
}

#[test]
fn every_fixture_matches_the_reference_through_the_engine_whatever_the_tiering() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let r = reference(&dir);
        let want_ids = ids(&r["generated_ids"]);
        for (streamed, host) in [
            (false, None),
            (true, Some(0)),
            (true, Some(PART_HOST_BYTES)),
        ] {
            let swap = tempfile::tempdir().unwrap();
            let engine = engine_with_host(&dir, host, swap.path());
            let request = reference_request(&dir, want_ids.len());
            let mut seen = Vec::new();
            let reply = engine.generate(&request, &mut |id| seen.push(id)).unwrap();
            assert_eq!(reply.ids, want_ids, "{name} host={host:?}");
            assert_eq!(seen, reply.ids, "{name}: on_token sees each id in order");
            assert_eq!(reply.prompt_ids, ids(&r["input_ids"]), "{name}");
            assert_eq!(reply.seed, None, "{name}: greedy by default");
            let got: Vec<f32> = reply.generated_logits.concat();
            let err = max_abs(&got, &flat(&r["generated_logits"]));
            assert!(err < 1e-4, "{name} host={host:?}: generated logits {err}");
            let logits = engine.prompt_logits(&request).unwrap();
            let err = max_abs(&flat(&logits), &flat(&r["logits"]));
            assert!(err < 1e-4, "{name} host={host:?}: prompt logits {err}");
            let host_weights = engine
                .manager()
                .stats()
                .resident
                .get(Tier::Host, TensorKind::Weight);
            if host == Some(PART_HOST_BYTES) {
                // The decoder kept (a few hundred KiB), the vision tower partly kept and
                // partly read from the checkpoint when used.
                let st = engine.weights().staging();
                assert!(host_weights > 0 && st.kept_bytes > 0, "{name}: {st:?}");
                assert!(
                    engine.weights().staged_bytes() > 0,
                    "{name}: nothing read on demand"
                );
            } else if streamed {
                // Nothing kept in RAM: every weight was read from the checkpoint.
                assert_eq!(host_weights, 0, "{name}");
                assert!(engine.weights().staged_bytes() > 0, "{name}");
                assert!(engine.kv_pool().is_none(), "{name}: no host KV budget");
            } else {
                assert!(host_weights > 0, "{name}");
                let kv = reply.stats.kv_pool.expect("paged KV with RAM to spare");
                assert!(kv.blocks > 0, "{name}");
                // The request's sequences are freed when it ends.
                assert_eq!(engine.kv_pool().unwrap().stats().sequences, 0, "{name}");
            }
        }
    }
}

/// Host memory whose activation budget (5%) holds the step arena of one of the two requests
/// below but not both at once.
const ONE_ARENA_HOST_BYTES: u64 = MIB;

#[test]
fn two_threads_on_one_engine_each_get_exactly_their_solo_result() {
    let dir = fixture_dir("qwen3-vl-tiny");
    // Ample budgets, every weight streamed, and RAM for one decode step arena at a time.
    for host_mem in [None, Some(0), Some(ONE_ARENA_HOST_BYTES)] {
        let swap = tempfile::tempdir().unwrap();
        let mut b = Engine::builder(&dir)
            .profile(laptop())
            .disk_path(swap.path());
        if let Some(bytes) = host_mem {
            b = b.gpu_mem(0).host_mem(bytes);
        }
        let engine = Arc::new(b.build().unwrap());
        let requests = [reference_request(&dir, 16), text_request()];
        let solo: Vec<Reply> = requests.iter().map(|r| generate(&engine, r)).collect();
        assert_ne!(solo[0].prompt_ids, solo[1].prompt_ids);
        if host_mem == Some(ONE_ARENA_HOST_BYTES) {
            for r in &solo {
                assert!(
                    matches!(r.stats.activations, Activations::Arena { .. }),
                    "{:?}",
                    r.stats.activations
                );
            }
        }
        for round in 0..5 {
            let start = Arc::new(Barrier::new(requests.len()));
            let together: Vec<Reply> = std::thread::scope(|s| {
                let handles: Vec<_> = requests
                    .iter()
                    .map(|r| {
                        let (engine, start) = (engine.clone(), start.clone());
                        s.spawn(move || {
                            start.wait();
                            generate(&engine, r)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for (alone, both) in solo.iter().zip(&together) {
                let at = format!("host_mem {host_mem:?}, round {round}");
                assert_eq!(alone.prompt_ids, both.prompt_ids);
                assert_eq!(alone.ids, both.ids, "{at}: ids differ from the solo run");
                assert!(
                    alone.generated_logits == both.generated_logits,
                    "{at}: logits differ from the solo run"
                );
                assert_eq!(alone.finish_reason, both.finish_reason);
                assert_eq!(
                    alone.stats.activations, both.stats.activations,
                    "{at}: the decode steps' activations went elsewhere than alone"
                );
            }
        }
    }
}

#[test]
fn sampled_requests_on_two_threads_replay_their_seeds() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let swap = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine(&dir, false, swap.path()));
    let sampled = |seed| SamplingParams {
        temperature: 1.5,
        seed: Some(seed),
        ..SamplingParams::greedy()
    };
    let requests = [
        reference_request(&dir, 12).sampling(sampled(7)),
        text_request().sampling(sampled(11)),
    ];
    let solo: Vec<Reply> = requests.iter().map(|r| generate(&engine, r)).collect();
    assert_eq!(solo[0].seed, Some(7));
    let together: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| {
                let engine = engine.clone();
                s.spawn(move || generate(&engine, r))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (alone, both) in solo.iter().zip(&together) {
        assert_eq!(alone.ids, both.ids, "each request's sampler is its own");
    }
}

#[test]
fn a_request_whose_kv_cache_fits_nowhere_is_refused_up_front() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let swap = tempfile::tempdir().unwrap();
    // 2 layers x 631 blocks of 16 tokens x 4 KiB (f32) = 4.9 MiB of KV for 94 + 10,000
    // tokens; the plan gives the host's KV budget the default context's 2 MiB (at most half
    // of 4 MiB), the disk's is 40% of 1 MiB.
    let engine = Engine::builder(&dir)
        .kv_dtype(KvDtype::F32)
        .profile(laptop())
        .host_mem(4 * MIB)
        .disk_mem(MIB)
        .disk_path(swap.path())
        .build()
        .unwrap();
    let long = Request::text("Describe the image.")
        .image(dir.join("image0.png"))
        .max_new_tokens(10_000);
    let refused = |e: EngineError| match e {
        EngineError::OutOfMemory {
            need_bytes,
            context_tokens,
            host_bytes,
            disk_bytes,
            ..
        } => {
            assert_eq!((need_bytes, context_tokens), (2 * 631 * 4 * 1024, 10_094));
            assert!(need_bytes > host_bytes + disk_bytes);
        }
        other => panic!("not refused for memory: {other:?}"),
    };
    refused(engine.check_request(&long).unwrap_err());
    let mut called = false;
    refused(engine.generate(&long, &mut |_| called = true).unwrap_err());
    assert!(!called, "no token before the refusal");
    // No KV block was taken.
    assert_eq!(engine.kv_pool().unwrap().stats().blocks, 0);
    // A short one on the same engine runs.
    let short = Request::text("Describe the image.")
        .image(dir.join("image0.png"))
        .max_new_tokens(4);
    engine.check_request(&short).unwrap();
    assert_eq!(generate(&engine, &short).ids.len(), 4);
    // Sizing the tiers for the long request refuses it too, before the manager exists; an
    // absurd number of new tokens is the same refusal, not an overflow.
    let sized = |r: &Request| {
        Engine::builder(&dir)
            .kv_dtype(KvDtype::F32)
            .profile(laptop())
            .host_mem(4 * MIB)
            .disk_mem(MIB)
            .disk_path(swap.path())
            .build_for(r)
    };
    assert!(matches!(
        sized(&long).unwrap_err(),
        EngineError::OutOfMemory { .. }
    ));
    let absurd = Request::ids(vec![1, 2, 3]).max_new_tokens(usize::MAX);
    assert!(matches!(
        sized(&absurd).unwrap_err(),
        EngineError::OutOfMemory { .. }
    ));
}

#[test]
fn the_engine_is_send_and_sync() {
    fn shared<T: Send + Sync>() {}
    shared::<Engine>();
    shared::<Arc<Engine>>();
    shared::<EngineError>();
}

#[test]
fn a_bad_model_dir_and_a_malformed_config_are_typed_errors() {
    let missing = Engine::builder("/no/such/checkpoint").build().unwrap_err();
    assert!(matches!(missing, EngineError::Checkpoint(_)), "{missing:?}");
    let src = fixture_dir("qwen3-vl-tiny");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    std::fs::write(tmp.path().join("config.json"), "{ not json").unwrap();
    let err = Engine::builder(tmp.path())
        .profile(laptop())
        .build()
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Checkpoint(vlmem_qwen3vl::Error::Config { .. })
        ),
        "{err:?}"
    );
    // A generation_config.json that is not JSON names the file.
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::write(tmp.path().join("generation_config.json"), "{ not json").unwrap();
    let err = Engine::builder(tmp.path())
        .profile(laptop())
        .build()
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::Checkpoint(_)) && err.to_string().contains("generation_config"),
        "{err:?}"
    );
}

#[test]
fn bad_requests_are_refused_as_bad_requests() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let swap = tempfile::tempdir().unwrap();
    let engine = engine(&dir, false, swap.path());
    let not_image = swap.path().join("not.png");
    std::fs::write(&not_image, b"this is not a png").unwrap();
    let bad = [
        Request::ids(vec![]),
        Request::ids(vec![1, 2, 999_999]),
        // Two image pads' worth of prompt, no image given.
        Request::ids(vec![1000, 1002, 1002, 1001]),
        Request::text("hi").image(not_image),
        Request::text("hi").sampling(SamplingParams {
            top_p: 2.0,
            ..SamplingParams::greedy()
        }),
    ];
    for request in &bad {
        let err = engine.generate(request, &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, EngineError::BadRequest(_)),
            "{request:?}: {err:?}"
        );
    }
    // An image file that is not there is an I/O error naming it.
    let gone = Request::text("hi").image(swap.path().join("gone.png"));
    assert!(matches!(
        engine.generate(&gone, &mut |_| {}).unwrap_err(),
        EngineError::Io { .. }
    ));
}

#[test]
fn a_conversation_a_text_prompt_and_their_ids_are_one_request() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let swap = tempfile::tempdir().unwrap();
    let engine = engine(&dir, false, swap.path());
    let image = dir.join("image0.png");
    let text = Request::text("Describe this image.").image(image.clone());
    let messages = Request::new(Prompt::Messages(vec![Message::user(vec![
        Part::Image,
        Part::Text("Describe this image.".into()),
    ])]))
    .image(image);
    let prepared = engine.prepare(&text).unwrap();
    assert_eq!(prepared, engine.prepare(&messages).unwrap());
    assert!(matches!(prepared.prompt, Prompt::Ids(_)));
    assert!(matches!(prepared.images[0], RequestImage::Preprocessed(_)));
    let a = generate(&engine, &text);
    let b = generate(&engine, &prepared);
    assert_eq!(a.ids, b.ids);
    assert_eq!(a.generated_logits, b.generated_logits);
    assert!(a.text.is_some());
    assert!(matches!(
        a.finish_reason,
        FinishReason::Stop | FinishReason::Length
    ));
}
