//! Device detection: the simulated device without a GPU (or without the `cuda` feature);
//! with `cuda` and a GPU, a real round trip through the engine (skipped elsewhere).
mod common;

use common::*;

#[test]
fn detect_device_falls_back_to_the_simulated_device() {
    let dev = vlmem_tier::detect_device(alloc(16 * MIB), Some(3_000_000_000), 0).unwrap();
    #[cfg(feature = "cuda")]
    let gpu = vlmem_tier::cuda::probe().is_some();
    #[cfg(not(feature = "cuda"))]
    let gpu = false;
    assert_eq!(dev.is_simulated(), !gpu);
    if dev.is_simulated() {
        assert!(dev.describe().contains("simulated"));
    }
    assert_eq!(dev.capacity_bytes(), 16 * MIB);
}

/// Ignored by default (most machines have no GPU); `.ci/gpu/check` runs it with
/// `--include-ignored`, where a missing GPU fails it.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU: run with --include-ignored (.ci/gpu/check)"]
fn cuda_round_trip_when_a_gpu_is_present() {
    use std::sync::Arc;
    use vlmem_tier::{Move, Priority, TierBackend};
    assert!(
        vlmem_tier::cuda::probe().is_some(),
        "no CUDA driver or GPU here"
    );
    let cuda = Arc::new(vlmem_tier::cuda::CudaDevice::new(alloc(64 * MIB), 0).unwrap());
    let dev: Arc<dyn TierBackend> = cuda.clone();
    assert!(!dev.is_simulated());
    eprintln!("{}", dev.describe());
    let h = host(64 * MIB);
    let pinned = cuda.pin_host(h.clone(), 16 << 20).unwrap();
    assert_eq!(pinned.pinned_bytes(), 64 * MIB);
    let e = engine(&[h.clone(), dev.clone()]);
    let len = 9 * MIB + 77;
    let data = pattern(len as usize, 1);
    let src = h.reserve(len, "x").unwrap();
    h.write(&src, 0, &data).unwrap();
    let on_dev = dev.reserve(len, "x").unwrap();
    e.submit(Move { src, dst: on_dev }, Priority::Demand)
        .unwrap()
        .wait()
        .unwrap();
    let back = h.reserve(len, "y").unwrap();
    e.submit(
        Move {
            src: on_dev,
            dst: back,
        },
        Priority::Demand,
    )
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(read_all(&*h, &back), data);
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_device_new_without_a_gpu_is_an_error_not_a_panic() {
    if vlmem_tier::cuda::probe().is_some() {
        return;
    }
    assert!(vlmem_tier::cuda::CudaDevice::new(alloc(MIB), 0).is_err());
}
