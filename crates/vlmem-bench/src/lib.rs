//! The `vlmem bench SUITE` harnesses. Each suite measures vlmem's figure and its baselines in
//! the same process and returns a [`SuiteReport`]; the CLI prints it as a table or as JSON
//! (`{"suite": "...", "results": [{"name", "value", "unit"}, ...]}`, see docs/CLI.md).

pub mod alloc;

pub mod e2e;

pub mod io;

pub mod replay;

pub mod serve;

/// The weight matrices of one qwen3-vl-2b text layer as (rows, cols) of its linear layers, in
/// use order: q, k, v, o, gate, up, down (the kernel examples' decode shapes).
pub const QWEN3VL_2B_LAYER_SHAPES: [(usize, usize); 7] = [
    (2048, 2048),
    (1024, 2048),
    (1024, 2048),
    (2048, 2048),
    (6144, 2048),
    (6144, 2048),
    (2048, 6144),
];

use serde::Serialize;

/// One measured figure. Baselines carry `@baseline` in their name, e.g. `kv_churn_ns_per_op@mimalloc`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchResult {
    /// The figure's name.
    pub name: String,
    /// Its value.
    pub value: f64,
    /// Its unit ("ns/op", "GB/s", "ratio", ...).
    pub unit: String,
}

impl BenchResult {
    /// A result.
    pub fn new(name: impl Into<String>, value: f64, unit: impl Into<String>) -> Self {
        BenchResult {
            name: name.into(),
            value,
            unit: unit.into(),
        }
    }
}

/// All figures of one suite.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SuiteReport {
    /// The suite's name ("alloc", "io", ...).
    pub suite: String,
    /// The figures, ours and the baselines'.
    pub results: Vec<BenchResult>,
    /// Free-form notes (machine, sizes, "simulated" where a device is simulated).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl SuiteReport {
    /// The value of the figure called `name`, if measured.
    pub fn value(&self, name: &str) -> Option<f64> {
        self.results
            .iter()
            .find(|r| r.name == name)
            .map(|r| r.value)
    }
}

/// Options shared by the suites.
#[derive(Debug, Clone, Copy, Default)]
pub struct BenchOptions {
    /// Smaller sizes and fewer repetitions (CI smoke runs); figures are then rougher.
    pub quick: bool,
}
