//! Measures the raw cost of the at-rest cipher and the CRC on one core (ignored by default:
//! `cargo test --release -p vlmem-tier --test aead_speed -- --ignored --nocapture`).
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use std::time::Instant;

/// CPU seconds used by this thread so far (utime + stime from /proc, 10 ms ticks).
fn thread_cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the command name: state is 0, utime is 11, stime is 12.
    (ticks(11) + ticks(12)) / 100.0
}

#[test]
#[ignore = "a measurement, not a check"]
fn aead_and_crc_throughput() {
    let c = ChaCha20Poly1305::new(Key::from_slice(&[7u8; 32]));
    let mut buf = vec![1u8; 64 << 20];
    let mut best = 0.0f64;
    let cpu0 = thread_cpu_secs();
    let wall0 = Instant::now();
    for round in 0..3u64 {
        let t0 = Instant::now();
        for (i, unit) in buf.chunks_mut(1 << 20).enumerate() {
            let mut n = [0u8; 12];
            n[..8].copy_from_slice(&(round * 1000 + i as u64).to_le_bytes());
            c.encrypt_in_place_detached(Nonce::from_slice(&n), b"aad", unit)
                .unwrap();
        }
        best = best.max(buf.len() as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    let cpu = thread_cpu_secs() - cpu0;
    let per_cpu = 3.0 * buf.len() as f64 / cpu.max(0.01) / 1e9;
    let wall = wall0.elapsed().as_secs_f64();
    println!(
        "chacha20poly1305: {per_cpu:.2} GB per CPU-second ({cpu:.2} s CPU in {wall:.2} s wall)"
    );
    let t0 = Instant::now();
    let crc = crc32c::crc32c(&buf);
    let crc_gbps = buf.len() as f64 / t0.elapsed().as_secs_f64() / 1e9;
    println!("chacha20poly1305 encrypt: {best:.2} GB/s; crc32c: {crc_gbps:.2} GB/s ({crc:#x})");
}
