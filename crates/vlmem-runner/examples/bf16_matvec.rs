//! Times the decode matvec on bf16 weights of the 2B's shapes (q/o 2048 x 2048, gate/up
//! 6144 x 2048, down 2048 x 6144, lm_head 151936 x 2048) on every path this CPU has
//! ([`bf16::Isa`]), split over the kernels' pool as `kernels::matvec` splits it, beside
//! `kernels::matvec_into` itself (the process's path) and the memory read probe on the same
//! bytes. Every repetition runs each of them once, in turn, so all see the same machine; each
//! call reads another copy of the matrix (at least 1 GiB of copies on transparent huge pages,
//! as the host tier holds weights: more than the last-level cache), so the weights come from
//! memory, and over as many repetitions as there are copies each of them reads every copy
//! once (copies may differ: a part of the buffer the kernel could not give huge pages). Prints the weight bytes read per second (median and best call) and each median
//! time over the AVX2 path's. Then each path on one thread on a matrix that stays in L2
//! (what the loop itself can do).
//!
//! `cargo run --release -p vlmem-runner --example bf16_matvec [iterations] [shapes]`, shapes
//! as `ROWSxCOLS[,ROWSxCOLS...]`.

use std::time::Instant;
use vlmem_runner::kernels::{self, WeightFormat, bf16, pool};

/// Bytes of weight copies the calls cycle through.
const COPIES_BYTES: usize = 1 << 30;

fn median(t: &mut [f64]) -> f64 {
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// Rows per task as `kernels::matvec` takes them: about 1 MiB of weights, at least two tasks
/// per thread where the matrix has the rows, at least 2^16 weights, a multiple of 4.
fn rows_per_task(rows: usize, cols: usize) -> usize {
    let by_balance = rows.div_ceil(pool::global().threads() * 2);
    let by_bytes = (1usize << 20).div_ceil(cols * 2);
    let by_size = (1usize << 16).div_ceil(cols);
    by_bytes.min(by_balance).max(by_size).max(1).div_ceil(4) * 4
}

/// `y = W x` on `isa` over the pool, the split input made once per call.
fn matvec_on(isa: bf16::Isa, w: &[u8], cols: usize, x: &[f32], y: &mut [f32]) {
    let rows = y.len();
    let per_task = rows_per_task(rows, cols);
    let split = isa.splits().then(|| bf16::SplitInput::new(x));
    let parts = y.chunks_mut(per_task).zip(w.chunks(per_task * cols * 2));
    pool::global().for_each(parts, |(y, w)| {
        bf16::matvec_rows_on(isa, w, WeightFormat::Bf16, cols, x, split.as_ref(), y)
    });
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let iters: usize = args.next().map_or(Ok(30), |s| s.parse())?;
    let iters = iters.max(1);
    let shapes: Vec<(usize, usize)> = args
        .next()
        .unwrap_or_else(|| "2048x2048,6144x2048,2048x6144,151936x2048".into())
        .split(',')
        .map(|s| {
            let (r, c) = s.split_once('x').ok_or("a shape is ROWSxCOLS")?;
            Ok::<_, Box<dyn std::error::Error>>((r.trim().parse()?, c.trim().parse()?))
        })
        .collect::<Result<_, _>>()?;
    let isas: Vec<bf16::Isa> = bf16::Isa::ALL
        .into_iter()
        .filter(|i| i.available() && *i != bf16::Isa::Scalar)
        .collect();
    println!(
        "bf16 paths here: {}; matvec_into takes {}; {} threads",
        isas.iter().map(|i| i.name()).collect::<Vec<_>>().join(", "),
        bf16::Isa::best().name(),
        pool::global().threads()
    );
    let largest = shapes.iter().map(|&(r, c)| r * c * 2).max().unwrap_or(0);
    let mut mem = vlmem_tier::HostBuffer::new(COPIES_BYTES.max(3 * largest), true)?;
    let buf = mem.as_mut_slice();
    // bf16 values of magnitude 2^-8 .. 2^-5 with random signs and mantissas.
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for pair in buf.chunks_exact_mut(2) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let bits = (seed as u16 & 0x80ff) | (0x3b80 + ((seed >> 20) as u16 & 0x0100));
        pair.copy_from_slice(&bits.to_le_bytes());
    }
    let buf = &*buf;
    let names: Vec<&str> = std::iter::once("probe")
        .chain(std::iter::once("matvec_into"))
        .chain(isas.iter().map(|i| i.name()))
        .collect();
    for &(rows, cols) in &shapes {
        let bytes = rows * cols * 2;
        let copies = (buf.len() / bytes).max(1);
        let stride = (copies / names.len()).max(1);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        let mut y = vec![0f32; rows];
        let mut times = vec![Vec::with_capacity(iters); names.len()];
        for it in 0..iters + 2 {
            for (k, t) in times.iter_mut().enumerate() {
                let w = &buf[(it + k * stride) % copies * bytes..][..bytes];
                let start = Instant::now();
                match k {
                    0 => {
                        std::hint::black_box(kernels::read_bandwidth_probe(w));
                    }
                    1 => kernels::matvec_into(w, WeightFormat::Bf16, rows, cols, &x, &mut y)?,
                    _ => matvec_on(isas[k - 2], w, cols, &x, &mut y),
                }
                // The first two rounds warm the pool and fault the pages in.
                if it >= 2 {
                    t.push(start.elapsed().as_secs_f64());
                }
            }
        }
        let avx2 = names.iter().position(|&n| n == "avx2");
        let medians: Vec<f64> = times.iter_mut().map(|t| median(t)).collect();
        for ((name, t), &m) in names.iter().zip(&times).zip(&medians) {
            let ratio = avx2.map_or(String::new(), |a| {
                format!("  {:.3} of avx2's time", m / medians[a])
            });
            println!(
                "{rows:>6} x {cols:<5} {name:<12} median {:>8.1} us {:>5.1} GB/s  best {:>5.1} GB/s{ratio}",
                m * 1e6,
                bytes as f64 / m / 1e9,
                bytes as f64 / t[0] / 1e9,
            );
        }
    }
    in_cache(&isas, buf);
    Ok(())
}

/// Each path on the calling thread on a 256 x 2048 matrix (1 MiB, in L2): weights per
/// nanosecond the loop itself reaches.
fn in_cache(isas: &[bf16::Isa], buf: &[u8]) {
    let (rows, cols) = (256usize, 2048usize);
    let w = &buf[..rows * cols * 2];
    let x: Vec<f32> = (0..cols).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut y = vec![0f32; rows];
    let mut times = vec![Vec::new(); isas.len()];
    for it in 0..400 {
        for (&isa, t) in isas.iter().zip(&mut times) {
            let split = isa.splits().then(|| bf16::SplitInput::new(&x));
            let start = Instant::now();
            bf16::matvec_rows_on(isa, w, WeightFormat::Bf16, cols, &x, split.as_ref(), &mut y);
            if it >= 20 {
                t.push(start.elapsed().as_secs_f64());
            }
        }
    }
    for (isa, t) in isas.iter().zip(&mut times) {
        let m = median(t);
        println!(
            "one thread, {rows} x {cols} in L2, {:<12} median {:>6.2} us  {:>5.1} weights/ns",
            isa.name(),
            m * 1e6,
            (rows * cols) as f64 / m / 1e9
        );
    }
}
