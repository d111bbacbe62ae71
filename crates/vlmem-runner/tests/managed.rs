//! Weights owned by the memory manager give the same outputs, bit for bit, whatever the
//! tiering: ample RAM, no RAM at all for weights (`--host-mem 0`: every weight streams from
//! the checkpoint's extents on the disk tier), and a RAM budget smaller than one layer
//! (constant eviction). The manager's counters show it did the work.

mod common;
use common::{FIXTURES, fixture_dir, ids, reference};

use candle_core::Device;
use std::path::Path;
use std::sync::Arc;
use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::{
    Activations, GenerateOptions, LogitsFor, ManagedWeights, PrefillOptions, Runner,
};

const MIB: u64 = 1 << 20;

fn outputs(runner: &Runner, dir: &Path) -> (Vec<f32>, Vec<u32>) {
    let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
    let ids = runner.chat_ids("Describe this image.", &images).unwrap();
    let model = runner.model();
    let mut kv = model.new_kv_cache();
    let opts = PrefillOptions {
        logits: LogitsFor::All,
        ..PrefillOptions::default()
    };
    let pre = model.prefill(&ids, &images, &mut kv, opts).unwrap();
    let logits = pre
        .logits
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let generate = GenerateOptions {
        max_new_tokens: 4,
        stop_ids: vec![],
        ..Default::default()
    };
    let generated = model
        .generate(&ids, &images, &generate, &mut |_| {})
        .unwrap()
        .generated_ids;
    (logits, generated)
}

/// A manager whose host tier gives weights `host_weight_bytes`.
fn manager(host_weight_bytes: u64) -> MemoryManager {
    let mut c = ManagerConfig::with_capacities(0, 8 * MIB, 4 * MIB);
    c.budgets.bytes[Tier::Host.index()][TensorKind::Weight.index()] = host_weight_bytes;
    MemoryManager::new(c).unwrap()
}

#[test]
fn managed_weights_match_whatever_the_tiering() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let expected = outputs(&Runner::open(&dir).unwrap(), &dir);
        let ckpt = Checkpoint::open(&dir).unwrap();
        // Ample RAM; none (streamed from disk); less than one layer; part of the decoder, the
        // rest streamed in pieces of 4 KiB (rows cut across pieces).
        for host_weight_bytes in [8 * MIB, 0, 32 * 1024, 104 * 1024] {
            let m = manager(host_weight_bytes);
            let weights =
                ManagedWeights::register(m.clone(), &ckpt, Tier::Host, &Device::Cpu).unwrap();
            let runner = Runner::with_weights(&ckpt, Arc::new(weights), &Device::Cpu).unwrap();
            assert_eq!(
                outputs(&runner, &dir),
                expected,
                "{name} with {host_weight_bytes} bytes of host budget for weights"
            );
            drop(runner); // stops the read-ahead thread
            let s = m.stats();
            assert_eq!(s.tensors as usize, ckpt.tensors.len());
            assert_eq!(s.pins, 0);
            let host = Tier::Host.index();
            match host_weight_bytes {
                0 => assert_eq!(s.counters.bytes_in[host], 0, "nothing may enter RAM"),
                // The plan's kept set fits its budget and everything else is read without
                // entering RAM: what is kept is reused and never evicted.
                _ => {
                    assert!(s.counters.hits[host] > 0, "{name}: no reuse");
                    assert_eq!(
                        s.counters.evictions[host], 0,
                        "{name}: a kept weight evicted"
                    );
                }
            }
            assert!(s.resident.get(Tier::Host, TensorKind::Weight) <= host_weight_bytes);
        }
    }
}

/// Decode through the bf16 kernel on the manager's bytes (pinned, or staged with no RAM for
/// weights), with and without prefetch: the greedy ids and every generated logit match the
/// reference within 1e-4.
#[test]
fn managed_decode_matches_the_reference_with_the_kernel() {
    for name in FIXTURES {
        let dir = fixture_dir(name);
        let r = reference(&dir);
        let prompt = ids(&r["input_ids"]);
        let want_ids = ids(&r["generated_ids"]);
        let want_logits = r["generated_logits"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let ckpt = Checkpoint::open(&dir).unwrap();
        for (host_weight_bytes, prefetch) in [
            (8 * MIB, 2),
            (8 * MIB, 0),
            (0, 2),
            (32 * 1024, 1),
            (200 * 1024, 2),
            (200 * 1024, 0),
            (104 * 1024, 2),
        ] {
            let m = manager(host_weight_bytes);
            let weights =
                ManagedWeights::register(m.clone(), &ckpt, Tier::Host, &Device::Cpu).unwrap();
            weights.set_prefetch_layers(prefetch);
            let weights = Arc::new(weights);
            let runner = Runner::with_weights(&ckpt, weights.clone(), &Device::Cpu).unwrap();
            // Decode steps keep their activations in the manager's step arena on the host.
            assert!(runner.model().use_step_arena(m.clone(), Tier::Host));
            let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
            let g = runner
                .model()
                .generate(
                    &prompt,
                    &images,
                    &GenerateOptions {
                        max_new_tokens: want_ids.len(),
                        stop_ids: vec![],
                        ..Default::default()
                    },
                    &mut |_| {},
                )
                .unwrap();
            let what = format!("{name}, host {host_weight_bytes} B, prefetch {prefetch}");
            match &g.activations {
                Activations::Arena {
                    tier,
                    capacity_bytes,
                    peak_bytes,
                    steps,
                } => {
                    assert_eq!(*tier, Tier::Host, "{what}");
                    assert_eq!(*steps as usize, want_ids.len() - 1, "{what}");
                    assert!(*peak_bytes > 0 && peak_bytes <= capacity_bytes, "{what}");
                }
                other => panic!("{what}: decode ran outside the arena: {other:?}"),
            }
            // Given back: no activation stays charged once generation ends.
            assert_eq!(
                m.stats().resident.get(Tier::Host, TensorKind::Activation),
                0,
                "{what}"
            );
            if host_weight_bytes == 104 * 1024 {
                // Small read-ahead buffers: the kernel multiplies streamed matrices piece by
                // piece, rows cut across pieces included, from buffers read ahead.
                let st = weights.staging();
                assert_eq!(st.buffer_bytes, 12 * 1024, "{what}: {st:?}");
                assert!(
                    st.streamed_pieces > 2 * st.streamed_tensors,
                    "{what}: {st:?}"
                );
                assert!(st.stats.hits > 0, "{what}: {st:?}");
            }
            // The read-ahead thread may still be reading for a next token: stop it (drop the
            // weights) before counting pins.
            drop(runner);
            drop(weights);
            assert_eq!(g.generated_ids, want_ids, "{what}");
            let got: Vec<f32> = g.generated_logits.concat();
            assert_eq!(got.len(), want_logits.len(), "{what}");
            let err = got
                .iter()
                .zip(&want_logits)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err < 1e-4, "{what}: generated_logits max-abs {err:e}");
            assert_eq!(m.stats().pins, 0, "{what}");
        }
    }
}

/// In MoE layers decode reads only the routed experts' slices of the fused expert stacks:
/// per token and MoE layer exactly top-k experts' gate_up and down matrices, and the stacks
/// never come whole into RAM (their only copy stays the checkpoint's extent on disk).
#[test]
fn moe_decode_reads_only_the_routed_experts() {
    for name in ["qwen3-vl-moe-tiny", "qwen3-vl-moe-tiny-released-layout"] {
        let dir = fixture_dir(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let text = &ckpt.config.text;
        let moe = text.moe.clone().unwrap();
        let layers = text.num_hidden_layers as usize;
        let moe_layers = (0..layers)
            .filter(|&l| moe.is_sparse_layer(l as u64))
            .count();
        assert!(moe_layers > 0);
        let (h, i) = (
            text.hidden_size as usize,
            moe.moe_intermediate_size as usize,
        );
        // bf16: gate_up is h x 2i, down is i x h, per expert.
        let per_expert = (h * 2 * i + i * h) * 2;
        let m = manager(8 * MIB);
        let weights =
            Arc::new(ManagedWeights::register(m.clone(), &ckpt, Tier::Host, &Device::Cpu).unwrap());
        let runner = Runner::with_weights(&ckpt, weights.clone(), &Device::Cpu).unwrap();
        let model = runner.model();
        let images = runner.load_images(&[dir.join("image0.png")]).unwrap();
        let prompt = runner.chat_ids("Describe this image.", &images).unwrap();
        let mut kv = model.new_kv_cache();
        let pre = model
            .prefill(&prompt, &images, &mut kv, PrefillOptions::default())
            .unwrap();
        let prefill_bytes = weights.expert_bytes();
        assert!(prefill_bytes > 0);
        let steps = 5;
        let mut token = 1u32;
        for position in (pre.positions.next_position..).take(steps) {
            let logits = model.decode_step(token, position, &mut kv).unwrap();
            token = vlmem_runner::model::argmax(&logits.to_vec1::<f32>().unwrap());
        }
        let decode_bytes = weights.expert_bytes() - prefill_bytes;
        let k = moe.num_experts_per_tok as usize;
        assert_eq!(
            decode_bytes as usize,
            steps * moe_layers * k * per_expert,
            "{name}: expert bytes read in {steps} decode steps"
        );
        for l in 0..layers {
            for t in ["gate_up_proj", "down_proj"] {
                let handle = weights
                    .handle(&format!("model.language_model.layers.{l}.mlp.experts.{t}"))
                    .unwrap();
                let (tiers, pins) = m.residency(handle).unwrap();
                assert_eq!(
                    tiers,
                    vec![Tier::Disk],
                    "{name}: layer {l} {t} was brought whole"
                );
                assert_eq!(pins, 0);
            }
        }
    }
}

/// With a budget that holds part of the decoder, the plan keeps a fixed set on the host tier
/// and streams the rest through the staging area: with prefetch the streamed tensors are
/// read ahead and taken from the area, nothing is evicted (streamed tensors never enter the
/// tier, so they never push a kept one out), every decode step reads the streamed bytes
/// once, and the ids equal the run without prefetch, which reads the same bytes on demand.
#[test]
fn streamed_weights_bypass_the_kept_set() {
    let dir = fixture_dir("qwen3-vl-tiny");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let prompt: Vec<u32> = vec![1, 2, 3, 4, 5];
    let mut runs = Vec::new();
    for prefetch in [2, 0] {
        let m = manager(200 * 1024);
        let weights =
            Arc::new(ManagedWeights::register(m.clone(), &ckpt, Tier::Host, &Device::Cpu).unwrap());
        weights.set_prefetch_layers(prefetch);
        let plan = weights.staging();
        assert!(
            plan.capacity_bytes > 0 && plan.streamed_tensors > 0,
            "{plan:?}"
        );
        assert!(plan.kept_bytes > 0 && plan.kept_bytes + plan.capacity_bytes <= 200 * 1024);
        // The norms' weights (a few bytes each) are kept first: none is streamed.
        assert!(
            weights
                .streamed_tensors()
                .iter()
                .all(|t| t.shape.len() == 2),
            "{:?}",
            weights.streamed_tensors()
        );
        let runner = Runner::with_weights(&ckpt, weights.clone(), &Device::Cpu).unwrap();
        let read = || m.stats().counters.bytes_in[Tier::Host.index()] + weights.staged_bytes();
        let mut at_first = None;
        let g = runner
            .model()
            .generate(
                &prompt,
                &[],
                &GenerateOptions {
                    max_new_tokens: 6,
                    stop_ids: vec![],
                    ..Default::default()
                },
                &mut |_| {
                    if at_first.is_none() {
                        at_first = Some(read());
                    }
                },
            )
            .unwrap();
        let steps = (g.generated_ids.len() - 1) as u64;
        let per_step = (read() - at_first.unwrap()) / steps;
        let after = weights.staging();
        // Stop the read-ahead thread (it may be reading for a next token) before counting
        // pins: the last owner of the weights joins it.
        drop(runner);
        drop(weights);
        let s = m.stats();
        assert_eq!(s.pins, 0);
        assert_eq!(
            s.counters.evictions[Tier::Host.index()],
            0,
            "prefetch {prefetch}"
        );
        assert_eq!(
            s.resident.get(Tier::Host, TensorKind::Weight),
            plan.kept_bytes
        );
        // The streamed bytes once per step, plus the embedding row of the new token. With
        // prefetch the count between the first and the last token is off by at most what
        // the area holds (read ahead before the first, or for a token that never comes).
        let slack = if prefetch > 0 {
            plan.capacity_bytes / steps
        } else {
            0
        };
        assert!(
            per_step + slack >= plan.streamed_bytes
                && per_step <= plan.streamed_bytes + 4096 + slack,
            "prefetch {prefetch}: {per_step} B per step for {} streamed",
            plan.streamed_bytes
        );
        if prefetch > 0 {
            assert!(after.stats.hits > 0, "{after:?}");
            assert_eq!(after.stats.dropped, 0, "{after:?}");
        } else {
            assert_eq!(after.stats.hits, 0, "{after:?}");
        }
        runs.push(g.generated_ids);
    }
    assert_eq!(runs[0], runs[1]);
}

/// A short text prompt prefills through the matmul kernel on the manager's bytes: every
/// hidden state and the logits of all positions match `Runner::open`'s (the same kernel on
/// the checkpoint's bytes) within 1e-4, and are bit-identical whatever the tiering (ample
/// RAM, none, a budget that streams part of the decoder).
#[test]
fn short_prefill_through_the_kernel_matches_candle() {
    for name in ["qwen3-vl-tiny", "qwen3-vl-moe-tiny-released-layout"] {
        let dir = fixture_dir(name);
        let ckpt = Checkpoint::open(&dir).unwrap();
        let prompt: Vec<u32> = vec![3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46];
        let opts = PrefillOptions {
            logits: LogitsFor::All,
            hidden_states: true,
            ..PrefillOptions::default()
        };
        let flat = |p: &vlmem_runner::model::Prefill| -> Vec<Vec<f32>> {
            let mut v: Vec<Vec<f32>> = p
                .hidden_states
                .iter()
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
                .collect();
            v.push(
                p.logits
                    .as_ref()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            v
        };
        let candle = {
            let runner = Runner::open(&dir).unwrap();
            let mut kv = runner.model().new_kv_cache();
            flat(&runner.model().prefill(&prompt, &[], &mut kv, opts).unwrap())
        };
        let mut first: Option<Vec<Vec<f32>>> = None;
        for host_weight_bytes in [8 * MIB, 0, 200 * 1024] {
            let m = manager(host_weight_bytes);
            let weights =
                ManagedWeights::register(m.clone(), &ckpt, Tier::Host, &Device::Cpu).unwrap();
            let runner = Runner::with_weights(&ckpt, Arc::new(weights), &Device::Cpu).unwrap();
            let mut kv = runner.model().new_kv_cache();
            let got = flat(&runner.model().prefill(&prompt, &[], &mut kv, opts).unwrap());
            assert_eq!(got.len(), candle.len());
            for (k, (a, b)) in got.iter().zip(&candle).enumerate() {
                let err = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(
                    err < 1e-4,
                    "{name}, host {host_weight_bytes} B: output {k} max-abs {err:e}"
                );
            }
            match &first {
                None => first = Some(got),
                Some(f) => assert_eq!(&got, f, "{name}: tiering changed the prefill"),
            }
        }
    }
}
