//! Weights owned by the memory manager give the same outputs, bit for bit, whatever the
//! tiering: ample RAM, no RAM at all for weights (`--host-mem 0`: every weight streams from
//! the checkpoint's extents on the disk tier), and a RAM budget smaller than one layer
//! (constant eviction). The manager's counters show it did the work.

use candle_core::Device;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmem::{ManagerConfig, MemoryManager, TensorKind, Tier};
use vlmem_qwen3vl::checkpoint::Checkpoint;
use vlmem_runner::{GenerateOptions, LogitsFor, ManagedWeights, PrefillOptions, Runner};

const MIB: u64 = 1 << 20;

fn fixture_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

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
    for name in [
        "qwen3-vl-tiny",
        "qwen3-vl-tiny-released-layout",
        "qwen3-vl-moe-tiny",
        "qwen3-vl-moe-tiny-released-layout",
    ] {
        let dir = fixture_dir(name);
        let expected = outputs(&Runner::open(&dir).unwrap(), &dir);
        let ckpt = Checkpoint::open(&dir).unwrap();
        // Ample RAM; none (streamed from disk); less than one layer (constant eviction).
        for host_weight_bytes in [8 * MIB, 0, 32 * 1024] {
            let m = manager(host_weight_bytes);
            let weights =
                ManagedWeights::register(m.clone(), &ckpt, Tier::Host, &Device::Cpu).unwrap();
            let runner = Runner::with_weights(&ckpt, Arc::new(weights), &Device::Cpu).unwrap();
            assert_eq!(
                outputs(&runner, &dir),
                expected,
                "{name} with {host_weight_bytes} bytes of host budget for weights"
            );
            let s = m.stats();
            assert_eq!(s.tensors as usize, ckpt.tensors.len());
            assert_eq!(s.pins, 0);
            let host = Tier::Host.index();
            match host_weight_bytes {
                0 => assert_eq!(s.counters.bytes_in[host], 0, "nothing may enter RAM"),
                b if b < MIB => assert!(s.counters.evictions[host] > 0, "{name}: no eviction"),
                _ => assert!(s.counters.hits[host] > 0, "{name}: no reuse"),
            }
            assert!(s.resident.get(Tier::Host, TensorKind::Weight) <= host_weight_bytes);
        }
    }
}
