//! Prints `vlmem bench alloc`'s figures without the CLI:
//! `cargo run -p vlmem-bench --release --example alloc [-- --quick] [-- --json]`.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let report = vlmem_bench::alloc::run(vlmem_bench::BenchOptions { quick });
    if args.iter().any(|a| a == "--json") {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("cannot print JSON: {e}"),
        }
        return;
    }
    for r in &report.results {
        println!("{:<45} {:>12.3} {}", r.name, r.value, r.unit);
    }
    for n in &report.notes {
        println!("note: {n}");
    }
}
