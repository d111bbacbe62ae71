//! Runs the `io` suite and prints it as JSON and as a table.
//! `cargo run --release -p vlmem-bench --example io -- [--quick] [DIR]`

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let dir = args
        .iter()
        .find(|a| !a.starts_with("--"))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let report = vlmem_bench::io::run_in(&dir, vlmem_bench::BenchOptions { quick });
    for r in &report.results {
        println!("{:<45} {:>10.3} {}", r.name, r.value, r.unit);
    }
    for n in &report.notes {
        println!("note: {n}");
    }
    match serde_json::to_string(&report) {
        Ok(j) => println!("{j}"),
        Err(e) => eprintln!("json: {e}"),
    }
}
