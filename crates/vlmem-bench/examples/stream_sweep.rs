//! The streamed decode of `vlmem bench e2e` (through the engine `vlmem run` uses, 1 GiB of
//! host RAM for weights) at several read-ahead reader counts, alternating, each beside the
//! disk tier's O_DIRECT probe at the same depth:
//! `cargo run --release -p vlmem-bench --example stream_sweep -- [READERS,...] [ROUNDS]`
//! (default `1,2,4 3`; the checkpoint from `$VLMEM_CACHE` as in the suite).

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let readers: Vec<usize> = args
        .first()
        .map(|a| a.split(',').filter_map(|v| v.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    let rounds = args.get(1).and_then(|v| v.parse().ok()).unwrap_or(3);
    for line in vlmem_bench::e2e::reader_sweep(&readers, rounds) {
        println!("{line}");
    }
}
