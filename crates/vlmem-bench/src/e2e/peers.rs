//! llama.cpp beside vlmem (`vlmem bench e2e --peers`): the same text decoder's shapes, the same
//! thread count, measured in the same run.
//!
//! The suite keeps, under its cache folder (`peers/`):
//! - a Python virtual environment (`python3 -m venv`) with the pinned `gguf` and
//!   `llama-cpp-python` packages from PyPI; pip builds llama.cpp from the sdist's own sources
//!   for this CPU (`GGML_NATIVE=ON`), once: later runs reuse the environment;
//! - GGUF files of the model's text decoder (llama.cpp arch `qwen3`: no interleaved M-RoPE
//!   and no DeepStack, which text-only decode does not use; the same weight bytes and FLOPs)
//!   with seeded random weights: BF16 written by the gguf package, Q8_0 and Q4_K_M made from it
//!   by llama.cpp's own quantizer (`llama_model_quantize`);
//! - the script that does the Python side ([`SCRIPT`], written out next to the environment).
//!
//! For each format llama.cpp (through llama-cpp-python's low-level API, `n_threads` = the
//! threads of vlmem's kernels) decodes one token per `llama_decode` after a short prompt,
//! greedy on the logits (`decode_tok_s.FMT@llama_cpp`), and processes a prompt in one
//! `llama_decode` (`prefill_tok_s.FMT@llama_cpp`); medians over repetitions after a warm-up.
//! Beside each, where vlmem measured the figure of the same name (or the one it stands for,
//! [`VLMEM_FIGURES`]), `FIGURE.FMT_over_llama_cpp` = vlmem / llama.cpp. Also:
//! `decode_tok_s.FMT@llama_cpp_perf` (llama.cpp's own timings of the same decode steps) and
//! `weight_bytes.FMT@llama_cpp`; the notes carry every repetition and the machine's load
//! average before each format (llama.cpp's spinning OpenMP threads lose most when the cores
//! are shared).
//!
//! Where the CPU lists AMX but the kernel does not support its tile data (a VM's), the build
//! leaves AMX out ([`CMAKE_ARGS_NO_AMX`]): ggml's AMX Q8_0/Q4_K kernels would fault there.

use super::{MODEL, cache_root, push};
use crate::SuiteReport;
use serde::Deserialize;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use vlmem_qwen3vl::Qwen3VlConfig;

/// The Python side, written next to the environment at run time.
pub const SCRIPT: &str = include_str!("../../peers/llama_cpp_bench.py");

/// The packages, pinned: the script uses llama-cpp-python's low-level API, whose names and
/// structs follow llama.cpp's C API of that release.
pub const GGUF_PACKAGE: &str = "gguf==0.19.0";
pub const LLAMA_CPP_PACKAGE: &str = "llama-cpp-python==0.3.36";

/// What pip's build of llama.cpp gets: this CPU's instruction sets, only the library.
pub const CMAKE_ARGS: &str = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
     -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF";

/// Added to [`CMAKE_ARGS`] where the CPU lists AMX but the kernel does not support its tile
/// data (some VMs): `-march=native` would compile ggml's AMX kernels, which then fault.
pub const CMAKE_ARGS_NO_AMX: &str = "'-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' \
     '-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'";

/// Bumped when the GGUF writer changes what it writes (cached files of another version are
/// written again).
const WRITER_VERSION: u32 = 1;

/// The random weights' seed.
const SEED: u64 = 0;

/// The formats measured: (key in figure names, the script's ftype, `None` for the BF16 file
/// the others are quantized from).
pub const FORMATS: [(&str, Option<&str>); 3] = [
    ("bf16", None),
    ("q8_0", Some("q8_0")),
    ("q4_k", Some("q4_k_m")),
];

/// For each llama.cpp figure (`FIGURE.FMT`), the vlmem figures it is set against, first found
/// wins: the same name, else the figure that measures the same thing today (every weight
/// resident in bf16 is `decode_tok_s.resident`).
pub const VLMEM_FIGURES: [(&str, &[&str]); 6] = [
    (
        "decode_tok_s.bf16",
        &["decode_tok_s.bf16", "decode_tok_s.resident"],
    ),
    ("decode_tok_s.q8_0", &["decode_tok_s.q8_0"]),
    ("decode_tok_s.q4_k", &["decode_tok_s.q4_k"]),
    ("prefill_tok_s.bf16", &["prefill_tok_s.bf16"]),
    ("prefill_tok_s.q8_0", &["prefill_tok_s.q8_0"]),
    ("prefill_tok_s.q4_k", &["prefill_tok_s.q4_k"]),
];

/// The suffix of llama.cpp's figures.
pub const PEER: &str = "@llama_cpp";

/// Why the peers could not be set up or measured.
#[derive(Debug)]
pub enum PeerError {
    /// No Python interpreter at `python`.
    PythonMissing { python: String, detail: String },
    /// A Python older than the packages need.
    PythonTooOld { python: String, version: String },
    /// `python -m venv` failed (Debian and Ubuntu ship venv separately).
    VenvFailed { python: String, detail: String },
    /// The environment has no pip.
    PipMissing { venv: PathBuf, detail: String },
    /// No C/C++ compiler for pip's build of llama.cpp.
    CompilerMissing,
    /// `pip install` failed; its whole output is in `log`.
    InstallFailed {
        packages: String,
        log: PathBuf,
        tail: String,
    },
    /// The model has a shape the GGUF writer does not write.
    Unsupported(String),
    /// A file or folder could not be made or read.
    Io { path: PathBuf, detail: String },
    /// A step of the script failed; its output is in `log`.
    Script {
        step: String,
        log: PathBuf,
        tail: String,
    },
    /// The script printed something that is not what it promises.
    Output { step: String, detail: String },
}

impl fmt::Display for PeerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerError::PythonMissing { python, detail } => write!(
                f,
                "--peers needs Python 3 with venv and pip, and `{python}` cannot run ({detail}): install them (Debian/Ubuntu: apt-get install python3 python3-venv python3-pip) or name an interpreter with VLMEM_PYTHON"
            ),
            PeerError::PythonTooOld { python, version } => write!(
                f,
                "--peers needs Python >= 3.9, and `{python}` is {version}: install a newer python3 or name one with VLMEM_PYTHON"
            ),
            PeerError::VenvFailed { python, detail } => write!(
                f,
                "`{python} -m venv` failed ({detail}): install Python's venv module (Debian/Ubuntu: apt-get install python3-venv)"
            ),
            PeerError::PipMissing { venv, detail } => write!(
                f,
                "the environment {} has no pip ({detail}): install pip (Debian/Ubuntu: apt-get install python3-pip python3-venv), then delete that folder",
                venv.display()
            ),
            PeerError::CompilerMissing => write!(
                f,
                "--peers builds llama.cpp from source and finds no C/C++ compiler (cc and c++, or $CC and $CXX): install one (Debian/Ubuntu: apt-get install build-essential)"
            ),
            PeerError::InstallFailed {
                packages,
                log,
                tail,
            } => write!(
                f,
                "pip install {packages} failed (it needs PyPI and, for llama-cpp-python, a C/C++ compiler; cmake comes from PyPI); the whole log is {}:\n{tail}",
                log.display()
            ),
            PeerError::Unsupported(what) => write!(f, "the llama.cpp peer cannot write {what}"),
            PeerError::Io { path, detail } => write!(f, "{}: {detail}", path.display()),
            PeerError::Script { step, log, tail } => write!(
                f,
                "the llama.cpp peer's {step} failed; its log is {}:\n{tail}",
                log.display()
            ),
            PeerError::Output { step, detail } => {
                write!(f, "the llama.cpp peer's {step} printed {detail}")
            }
        }
    }
}

impl std::error::Error for PeerError {}

fn io_err(path: &Path, e: impl fmt::Display) -> PeerError {
    PeerError::Io {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

/// A progress line on stderr (stdout may carry the suite's JSON).
fn progress(msg: &str) {
    eprintln!("[e2e --peers] {msg}");
}

// ---------------------------------------------------------------------------------------------
// The GGUF's shape

/// The text decoder as the GGUF writer takes it (llama.cpp arch `qwen3`).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufShape {
    pub hidden: u64,
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    pub intermediate: u64,
    pub vocab: u64,
    /// The context length written (the model's maximum positions).
    pub context: u64,
    pub rope_theta: f64,
    pub rms_eps: f64,
    /// The output projection is the token embedding (no `output.weight`).
    pub tied: bool,
}

impl GgufShape {
    /// The text decoder of `cfg`; a MoE decoder is not written.
    pub fn of(cfg: &Qwen3VlConfig) -> Result<GgufShape, PeerError> {
        let t = &cfg.text;
        if t.moe.is_some() {
            return Err(PeerError::Unsupported(
                "a MoE text decoder (llama.cpp arch qwen3moe)".into(),
            ));
        }
        Ok(GgufShape {
            hidden: t.hidden_size,
            layers: t.num_hidden_layers,
            heads: t.num_attention_heads,
            kv_heads: t.num_key_value_heads,
            head_dim: t.head_dim,
            intermediate: t.intermediate_size,
            vocab: t.vocab_size,
            context: t.max_position_embeddings,
            rope_theta: t.rope_theta,
            rms_eps: t.rms_norm_eps,
            tied: t.tie_word_embeddings,
        })
    }

    /// Parameters the writer writes: the embedding (and the output projection when untied),
    /// the final norm, and per layer q, k, v, o, the q/k norms, two norms and the MLP.
    pub fn params(&self) -> u64 {
        let h = self.hidden;
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        let layer =
            h * q + 2 * h * kv + q * h + 3 * h * self.intermediate + 2 * h + 2 * self.head_dim;
        let embed = self.vocab * h * if self.tied { 1 } else { 2 };
        embed + h + self.layers * layer
    }

    /// The script's `write` arguments for a BF16 file at `out`.
    pub fn write_args(&self, out: &Path, seed: u64) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["write".into(), "--out".into(), out.into()];
        let ints = [
            ("--hidden", self.hidden),
            ("--layers", self.layers),
            ("--heads", self.heads),
            ("--kv-heads", self.kv_heads),
            ("--head-dim", self.head_dim),
            ("--intermediate", self.intermediate),
            ("--vocab", self.vocab),
            ("--context", self.context),
            ("--seed", seed),
            ("--tied", u64::from(self.tied)),
        ];
        for (k, v) in ints {
            a.push(k.into());
            a.push(v.to_string().into());
        }
        a.push("--rope-theta".into());
        a.push(format!("{:?}", self.rope_theta).into());
        a.push("--rms-eps".into());
        a.push(format!("{:?}", self.rms_eps).into());
        a
    }

    /// What identifies a written file: the writer's version and its arguments but the path.
    fn fingerprint(&self, seed: u64) -> String {
        let args = self.write_args(Path::new(""), seed);
        let args: Vec<String> = args[3..]
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        format!("writer {WRITER_VERSION} {}", args.join(" "))
    }
}

// ---------------------------------------------------------------------------------------------
// The script's output

/// What the script's `write` reports.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Written {
    pub params: u64,
    pub file_bytes: u64,
    pub seconds: f64,
}

/// What the script's `quantize` reports.
#[derive(Debug, Deserialize, PartialEq)]
pub struct Quantized {
    pub file_bytes: u64,
    pub seconds: f64,
}

/// What the script's `cpu` reports.
#[derive(Debug, Deserialize, PartialEq, Clone, Copy)]
pub struct CpuInfo {
    /// `/proc/cpuinfo` lists `amx_tile`.
    pub amx_advertised: bool,
    /// The kernel supports the AMX tile data state (`None`: could not ask).
    pub amx_usable: Option<bool>,
}

/// The build's CMAKE_ARGS for a CPU: [`CMAKE_ARGS`], and [`CMAKE_ARGS_NO_AMX`] when the CPU
/// advertises AMX the kernel does not support.
pub fn cmake_args(cpu: Option<CpuInfo>) -> String {
    match cpu {
        Some(CpuInfo {
            amx_advertised: true,
            amx_usable: Some(false),
        }) => format!("{CMAKE_ARGS} {CMAKE_ARGS_NO_AMX}"),
        _ => CMAKE_ARGS.to_string(),
    }
}

/// What the script's `versions` reports.
#[derive(Debug, Deserialize, PartialEq, Default)]
pub struct Versions {
    pub python: String,
    pub gguf: Option<String>,
    pub llama_cpp_python: Option<String>,
    pub system_info: Option<String>,
    pub gguf_error: Option<String>,
    pub llama_cpp_error: Option<String>,
}

/// What the script's `bench` reports for one GGUF.
#[derive(Debug, Deserialize, PartialEq)]
pub struct BenchOut {
    pub desc: String,
    pub params: u64,
    pub model_bytes: u64,
    pub threads: usize,
    pub load_s: f64,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub prefill_tok_s: Vec<f64>,
    pub decode_tok_s: Vec<f64>,
    /// llama.cpp's own count (`llama_perf_context`: decode tokens over its eval time).
    #[serde(default)]
    pub decode_tok_s_llama: Vec<f64>,
    pub prefill_tok_s_median: f64,
    pub decode_tok_s_median: f64,
}

/// The JSON object on the last non-empty line of `stdout` (the script prints its result last;
/// libraries may print before it).
pub fn parse_last_json<T: for<'de> Deserialize<'de>>(
    step: &str,
    stdout: &str,
) -> Result<T, PeerError> {
    let line = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| PeerError::Output {
            step: step.into(),
            detail: "nothing".into(),
        })?;
    serde_json::from_str(line).map_err(|e| PeerError::Output {
        step: step.into(),
        detail: format!("`{line}`, not its result ({e})"),
    })
}

/// The median of `v` (NaN when empty).
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One format's llama.cpp figures into `report`: `decode_tok_s.KEY@llama_cpp` and
/// `prefill_tok_s.KEY@llama_cpp` (medians over the repetitions, recomputed here rather than
/// trusted), llama.cpp's own decode count and the model's bytes.
pub fn push_bench(report: &mut SuiteReport, key: &str, b: &BenchOut) -> Result<(), PeerError> {
    let decode = median(&b.decode_tok_s);
    let prefill = median(&b.prefill_tok_s);
    if !(decode > 0.0 && prefill > 0.0) {
        return Err(PeerError::Output {
            step: format!("bench of {key}"),
            detail: format!(
                "no positive speeds (decode {:?}, prefill {:?})",
                b.decode_tok_s, b.prefill_tok_s
            ),
        });
    }
    push(
        report,
        &format!("decode_tok_s.{key}{PEER}"),
        decode,
        "tok/s",
    );
    push(
        report,
        &format!("prefill_tok_s.{key}{PEER}"),
        prefill,
        "tok/s",
    );
    let own = median(&b.decode_tok_s_llama);
    if own.is_finite() {
        push(
            report,
            &format!("decode_tok_s.{key}@llama_cpp_perf"),
            own,
            "tok/s",
        );
    }
    push(
        report,
        &format!("weight_bytes.{key}{PEER}"),
        b.model_bytes as f64,
        "B",
    );
    report.notes.push(format!(
        "llama.cpp {key}: {} ({:.3} GB, {} params), {} threads, loaded in {:.2} s; decode {} tokens per run {:?} tok/s (llama's own timings {:?}), prompt of {} tokens {:?} tok/s",
        b.desc,
        b.model_bytes as f64 / 1e9,
        b.params,
        b.threads,
        b.load_s,
        b.decode_tokens,
        round2(&b.decode_tok_s),
        round2(&b.decode_tok_s_llama),
        b.prompt_tokens,
        round2(&b.prefill_tok_s),
    ));
    Ok(())
}

fn round2(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| (x * 100.0).round() / 100.0).collect()
}

/// A llama.cpp figure and the vlmem figure set against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    /// llama.cpp's figure: `FIGURE.FMT@llama_cpp`.
    pub peer: String,
    pub peer_value: f64,
    /// vlmem's figure ([`VLMEM_FIGURES`]) and its value, when measured.
    pub vlmem: Option<(String, f64)>,
}

impl Pair {
    /// `FIGURE.FMT`.
    pub fn figure(&self) -> &str {
        self.peer.trim_end_matches(PEER)
    }

    /// vlmem / llama.cpp, when both are measured.
    pub fn ratio(&self) -> Option<f64> {
        match &self.vlmem {
            Some((_, v)) if self.peer_value > 0.0 => Some(v / self.peer_value),
            _ => None,
        }
    }
}

/// For each llama.cpp figure in `report`, the vlmem figure set against it
/// ([`VLMEM_FIGURES`]).
pub fn pairs(report: &SuiteReport) -> Vec<Pair> {
    pairs_of(report, &VLMEM_FIGURES)
}

/// [`pairs`] for another suite's list of (figure, the vlmem figures that stand for it).
pub(crate) fn pairs_of(report: &SuiteReport, figures: &[(&str, &[&str])]) -> Vec<Pair> {
    figures
        .iter()
        .filter_map(|(figure, candidates)| {
            let peer = format!("{figure}{PEER}");
            let peer_value = report.value(&peer)?;
            let vlmem = candidates
                .iter()
                .find_map(|c| report.value(c).map(|v| (c.to_string(), v)));
            Some(Pair {
                peer,
                peer_value,
                vlmem,
            })
        })
        .collect()
}

/// `FIGURE.FMT_over_llama_cpp` = vlmem / llama.cpp for every pair [`pairs`] finds both of.
pub fn push_ratios(report: &mut SuiteReport) {
    push_ratios_of(report, &VLMEM_FIGURES);
}

/// [`push_ratios`] for another suite's list of figures (see [`pairs_of`]).
pub(crate) fn push_ratios_of(report: &mut SuiteReport, figures: &[(&str, &[&str])]) {
    for p in pairs_of(report, figures) {
        if let Some(r) = p.ratio() {
            push(
                report,
                &format!("{}_over_llama_cpp", p.figure()),
                r,
                "ratio",
            );
        }
    }
}

/// The human table of llama.cpp's figures beside vlmem's (empty when there are none).
pub fn peer_table(report: &SuiteReport) -> Vec<String> {
    table_of(pairs(report))
}

/// The table of `rows` ([`peer_table`]'s layout, the first column as wide as its longest
/// figure).
pub(crate) fn table_of(rows: Vec<Pair>) -> Vec<String> {
    if rows.is_empty() {
        return Vec::new();
    }
    let w = rows.iter().map(|p| p.figure().len()).fold(22, usize::max);
    let mut out = vec![format!(
        "  {:w$} {:>12} {:>12} {:>8}  {}",
        "figure (tok/s)", "vlmem", "llama.cpp", "ratio", "vlmem's figure"
    )];
    for p in rows {
        let (v, from) = match &p.vlmem {
            Some((name, v)) => (format!("{v:.3}"), name.as_str()),
            None => ("-".into(), "not measured"),
        };
        let ratio = p.ratio().map_or("-".into(), |r| format!("{r:.2}"));
        out.push(format!(
            "  {:w$} {v:>12} {:>12.3} {ratio:>8}  {from}",
            p.figure(),
            p.peer_value
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Running the Python side

/// Runs `cmd` with stderr appended to `log` and stdout to `out` (`None`: to `log` too), a
/// progress line every 30 s (with `watch`'s view of the log when given); its status.
fn run_watched(
    mut cmd: Command,
    out: Option<&Path>,
    log: &Path,
    what: &str,
    watch: Option<fn(&str) -> Option<String>>,
) -> Result<ExitStatus, PeerError> {
    let stderr = File::options()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| io_err(log, e))?;
    let stdout = match out {
        Some(out) => File::create(out).map_err(|e| io_err(out, e))?,
        None => stderr.try_clone().map_err(|e| io_err(log, e))?,
    };
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .map_err(|e| io_err(Path::new(&format!("{:?}", cmd.get_program())), e))?;
    let mut last = Instant::now();
    loop {
        if let Some(status) = child.try_wait().map_err(|e| io_err(log, e))? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(200));
        if last.elapsed() >= Duration::from_secs(30) {
            last = Instant::now();
            let seen = watch
                .and_then(|w| w(&tail_of(log, 64 << 10)))
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            progress(&format!(
                "{what}: {:.0} s{seen}",
                started.elapsed().as_secs_f64()
            ));
        }
    }
}

/// The last `bytes` of the file at `path` (lossy text; empty when unreadable).
fn tail_of(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The build's progress in pip's verbose log: the last `[k/n]` step of the compile.
pub fn build_step(log_tail: &str) -> Option<String> {
    log_tail.lines().rev().find_map(|l| {
        let l = l.trim_start();
        let rest = l.strip_prefix('[')?;
        let (step, _) = rest.split_once(']')?;
        let (k, n) = step.split_once('/')?;
        let (k, n): (u64, u64) = (k.trim().parse().ok()?, n.trim().parse().ok()?);
        Some(format!("compiling llama.cpp, step {k} of {n}"))
    })
}

/// The Python the suite uses: `$VLMEM_PYTHON`, else `python3`.
pub fn python() -> OsString {
    std::env::var_os("VLMEM_PYTHON").unwrap_or_else(|| "python3".into())
}

/// The peers' folder under the cache.
pub fn peers_dir() -> PathBuf {
    cache_root().join("peers")
}

/// The environment's interpreter.
fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// Checks `python` runs and is new enough: its version.
pub fn check_python(python: &OsString) -> Result<String, PeerError> {
    let shown = python.to_string_lossy().into_owned();
    let out = Command::new(python)
        .args(["-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PeerError::PythonMissing {
            python: shown.clone(),
            detail: e.to_string(),
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || version.is_empty() {
        return Err(PeerError::PythonMissing {
            python: shown,
            detail: format!(
                "{}: {}",
                out.status,
                last_lines(&String::from_utf8_lossy(&out.stderr), 3)
            ),
        });
    }
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if (major, minor) < (3, 9) {
        return Err(PeerError::PythonTooOld {
            python: shown,
            version,
        });
    }
    Ok(version)
}

/// Whether a C and a C++ compiler run (`$CC`/`cc`, `$CXX`/`c++`).
fn compilers_present() -> bool {
    let runs = |var: &str, default: &str| {
        let prog = std::env::var_os(var).unwrap_or_else(|| default.into());
        Command::new(prog)
            .arg("--version")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    runs("CC", "cc") && runs("CXX", "c++")
}

/// What the environment's marker records: the packages and the build's arguments.
fn venv_marker_text(cmake: &str) -> String {
    format!("{GGUF_PACKAGE}\n{LLAMA_CPP_PACKAGE}\nCMAKE_ARGS={cmake}\n")
}

/// A ready environment: its folder, the versions it reports, the CMAKE_ARGS its llama.cpp
/// was built with.
#[derive(Debug)]
pub struct Venv {
    pub dir: PathBuf,
    pub versions: Versions,
    pub cmake_args: String,
}

/// The environment under `dir` with the pinned packages, for `python`: reused when its
/// marker (packages, CMAKE_ARGS for this CPU) matches and both packages import, else made
/// (`python -m venv`) and installed (pip builds llama.cpp: minutes).
pub fn ensure_venv(python: &OsString, dir: &Path) -> Result<Venv, PeerError> {
    let venv = dir.join("venv");
    let marker = venv.join("vlmem-peers.txt");
    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    write_script(dir)?;
    // The script's log holds this run only.
    let _ = std::fs::remove_file(dir.join("peers.log"));
    let version = check_python(python)?;
    let cpu = script_in(Path::new(python), dir, "CPU check", &["cpu".into()])
        .and_then(|out| parse_last_json::<CpuInfo>("CPU check", &out))
        .ok();
    let cmake = cmake_args(cpu);
    let want = venv_marker_text(&cmake);
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == want)
        && let Ok(v) = versions(&venv, dir)
        && v.gguf.is_some()
        && v.llama_cpp_python.is_some()
    {
        progress(&format!("reusing the environment {}", venv.display()));
        return Ok(Venv {
            dir: venv,
            versions: v,
            cmake_args: cmake,
        });
    }
    let shown = python.to_string_lossy().into_owned();
    if !venv_python(&venv).exists() {
        progress(&format!(
            "making a Python {version} environment in {}",
            venv.display()
        ));
        let out = Command::new(python)
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| PeerError::VenvFailed {
                python: shown.clone(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            // A half-made environment would be taken for one next time.
            let _ = std::fs::remove_dir_all(&venv);
            return Err(PeerError::VenvFailed {
                python: shown,
                detail: last_lines(
                    &format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ),
                    4,
                ),
            });
        }
    }
    let vpy = venv_python(&venv);
    let pip = Command::new(&vpy)
        .args(["-m", "pip", "--version"])
        .stdin(Stdio::null())
        .output();
    match pip {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Err(PeerError::PipMissing {
                venv,
                detail: last_lines(&String::from_utf8_lossy(&o.stderr), 3),
            });
        }
        Err(e) => {
            return Err(PeerError::PipMissing {
                venv,
                detail: e.to_string(),
            });
        }
    }
    if !compilers_present() {
        return Err(PeerError::CompilerMissing);
    }
    let _ = std::fs::remove_file(&marker);
    let log = dir.join("pip-install.log");
    let _ = std::fs::remove_file(&log);
    progress(&format!(
        "installing {GGUF_PACKAGE} and {LLAMA_CPP_PACKAGE} from PyPI into {}; pip builds llama.cpp from the sdist's sources for this CPU (CMAKE_ARGS={cmake}): this takes minutes (about 10 on 2 cores) and happens once; the log is {}",
        venv.display(),
        log.display()
    ));
    let started = Instant::now();
    let mut cmd = Command::new(&vpy);
    // --no-cache-dir: pip's wheel cache would hand back a wheel built for other CMAKE_ARGS.
    cmd.args([
        "-m",
        "pip",
        "install",
        "-v",
        "--no-cache-dir",
        "--disable-pip-version-check",
        GGUF_PACKAGE,
        LLAMA_CPP_PACKAGE,
    ])
    .env("CMAKE_ARGS", &cmake);
    if std::env::var_os("CMAKE_BUILD_PARALLEL_LEVEL").is_none() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cmd.env("CMAKE_BUILD_PARALLEL_LEVEL", cores.to_string());
    }
    let status = run_watched(cmd, None, &log, "pip install", Some(build_step))?;
    if !status.success() {
        return Err(PeerError::InstallFailed {
            packages: format!("{GGUF_PACKAGE} {LLAMA_CPP_PACKAGE}"),
            tail: last_lines(&tail_of(&log, 64 << 10), 12),
            log,
        });
    }
    let v = versions(&venv, dir)?;
    if v.gguf.is_none() || v.llama_cpp_python.is_none() {
        return Err(PeerError::InstallFailed {
            packages: format!("{GGUF_PACKAGE} {LLAMA_CPP_PACKAGE}"),
            log,
            tail: format!(
                "installed, but does not import: gguf {:?}, llama_cpp {:?}",
                v.gguf_error, v.llama_cpp_error
            ),
        });
    }
    std::fs::write(&marker, want).map_err(|e| io_err(&marker, e))?;
    progress(&format!(
        "installed in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(Venv {
        dir: venv,
        versions: v,
        cmake_args: cmake,
    })
}

/// Writes [`SCRIPT`] into `dir` (when it differs from what is there).
fn write_script(dir: &Path) -> Result<PathBuf, PeerError> {
    let path = dir.join("llama_cpp_bench.py");
    if std::fs::read_to_string(&path).ok().as_deref() != Some(SCRIPT) {
        std::fs::write(&path, SCRIPT).map_err(|e| io_err(&path, e))?;
    }
    Ok(path)
}

/// Runs the script's `args` in the environment: its stdout (the log of stderr in
/// `dir/peers.log`).
pub(crate) fn script(
    venv: &Path,
    dir: &Path,
    step: &str,
    args: &[OsString],
) -> Result<String, PeerError> {
    script_in(&venv_python(venv), dir, step, args)
}

/// [`script`] run through `launcher` (a program and its arguments, given the interpreter,
/// the script and `args` after them: a wrapper that puts the process in a memory cgroup).
pub(crate) fn script_launched(
    launcher: &[OsString],
    venv: &Path,
    dir: &Path,
    step: &str,
    args: &[OsString],
) -> Result<String, PeerError> {
    script_with(launcher, &venv_python(venv), dir, step, args)
}

/// Runs the script's `args` with the interpreter `python`: its stdout.
fn script_in(
    python: &Path,
    dir: &Path,
    step: &str,
    args: &[OsString],
) -> Result<String, PeerError> {
    script_with(&[], python, dir, step, args)
}

/// [`script_in`] through `launcher` (empty: none).
fn script_with(
    launcher: &[OsString],
    python: &Path,
    dir: &Path,
    step: &str,
    args: &[OsString],
) -> Result<String, PeerError> {
    let log = dir.join("peers.log");
    let out = dir.join("script.out");
    let mut cmd = match launcher.split_first() {
        Some((program, rest)) => {
            let mut c = Command::new(program);
            c.args(rest).arg(python);
            c
        }
        None => Command::new(python),
    };
    cmd.arg(dir.join("llama_cpp_bench.py")).args(args);
    let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let status = run_watched(cmd, Some(&out), &log, step, None)?;
    let stdout = std::fs::read_to_string(&out).map_err(|e| io_err(&out, e))?;
    if !status.success() {
        let len = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        return Err(PeerError::Script {
            step: step.into(),
            log,
            tail: last_lines(&tail_of(&dir.join("peers.log"), len - before.min(len)), 12),
        });
    }
    Ok(stdout)
}

fn versions(venv: &Path, dir: &Path) -> Result<Versions, PeerError> {
    let out = script(venv, dir, "versions", &["versions".into()])?;
    parse_last_json("versions", &out)
}

// ---------------------------------------------------------------------------------------------
// The suite's part

/// A ready environment and GGUF files.
pub struct Prepared {
    pub(crate) dir: PathBuf,
    pub(crate) venv: PathBuf,
    /// (format key, GGUF file).
    pub(crate) files: Vec<(&'static str, PathBuf)>,
    /// llama.cpp's threads: the threads of vlmem's kernels.
    pub(crate) threads: usize,
    quick: bool,
    pub(crate) notes: Vec<String>,
}

/// The environment and the GGUF files of `cfg`'s text decoder (`name` names the files),
/// made or reused; a typed error when Python, pip, a compiler or the install is missing.
pub fn prepare(cfg: &Qwen3VlConfig, name: &str, quick: bool) -> Result<Prepared, PeerError> {
    prepare_formats(cfg, name, quick, &FORMATS)
}

/// [`prepare`] with only the GGUF files of `formats` (a sub-list of [`FORMATS`]).
pub(crate) fn prepare_formats(
    cfg: &Qwen3VlConfig,
    name: &str,
    quick: bool,
    formats: &[(&'static str, Option<&'static str>)],
) -> Result<Prepared, PeerError> {
    let dir = peers_dir();
    let shape = GgufShape::of(cfg)?;
    let Venv {
        dir: venv,
        versions: v,
        cmake_args,
    } = ensure_venv(&python(), &dir)?;
    let threads = vlmem_runner::kernels::pool::global().threads();
    let mut notes = vec![format!(
        "llama.cpp peer: Python {}, gguf {}, llama-cpp-python {} (llama.cpp built by pip with CMAKE_ARGS={cmake_args}), {threads} threads (vlmem's kernels' pool); {}",
        v.python,
        v.gguf.as_deref().unwrap_or("?"),
        v.llama_cpp_python.as_deref().unwrap_or("?"),
        v.system_info.as_deref().unwrap_or("")
    )];
    let fingerprint = shape.fingerprint(SEED);
    let bf16 = dir.join(format!("{name}-text-bf16.gguf"));
    let mut files = Vec::new();
    for &(key, ftype) in formats {
        let path = match ftype {
            None => bf16.clone(),
            Some(f) => dir.join(format!("{name}-text-{f}.gguf")),
        };
        let stamp = PathBuf::from(format!("{}.json", path.display()));
        let want = format!("{fingerprint} {}", ftype.unwrap_or("bf16"));
        if path.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
            notes.push(format!("{} (reused)", path.display()));
            files.push((key, path));
            continue;
        }
        let _ = std::fs::remove_file(&stamp);
        match ftype {
            None => {
                progress(&format!(
                    "writing {} ({:.2} B random parameters, BF16)",
                    path.display(),
                    shape.params() as f64 / 1e9
                ));
                let out = script(&venv, &dir, "GGUF writer", &shape.write_args(&path, SEED))?;
                let w: Written = parse_last_json("GGUF writer", &out)?;
                if w.params != shape.params() {
                    return Err(PeerError::Output {
                        step: "GGUF writer".into(),
                        detail: format!(
                            "{} parameters written, {} expected",
                            w.params,
                            shape.params()
                        ),
                    });
                }
                notes.push(format!(
                    "{} written in {:.1} s ({:.3} GB)",
                    path.display(),
                    w.seconds,
                    w.file_bytes as f64 / 1e9
                ));
            }
            Some(f) => {
                progress(&format!(
                    "quantizing {} with llama.cpp's quantizer",
                    path.display()
                ));
                let args: Vec<OsString> = vec![
                    "quantize".into(),
                    "--inp".into(),
                    bf16.clone().into(),
                    "--out".into(),
                    path.clone().into(),
                    "--ftype".into(),
                    f.into(),
                    "--threads".into(),
                    threads.to_string().into(),
                ];
                let step = format!("quantizer ({f})");
                let out = script(&venv, &dir, &step, &args)?;
                let q: Quantized = parse_last_json(&step, &out)?;
                notes.push(format!(
                    "{} quantized by llama_model_quantize in {:.1} s ({:.3} GB)",
                    path.display(),
                    q.seconds,
                    q.file_bytes as f64 / 1e9
                ));
            }
        }
        std::fs::write(&stamp, &want).map_err(|e| io_err(&stamp, e))?;
        files.push((key, path));
    }
    Ok(Prepared {
        dir,
        venv,
        files,
        threads,
        quick,
        notes,
    })
}

/// llama.cpp's figures for every prepared format into `report`, then the ratios to vlmem's
/// figures of the same names. A format that fails is a note; the others still count.
pub fn measure(p: &Prepared, report: &mut SuiteReport) {
    report.notes.extend(p.notes.iter().cloned());
    let (decode_tokens, prompt_tokens, reps) = if p.quick { (8, 128, 1) } else { (32, 512, 3) };
    for (key, file) in &p.files {
        progress(&format!(
            "timing llama.cpp on {} ({} threads)",
            file.display(),
            p.threads
        ));
        let args: Vec<OsString> = vec![
            "bench".into(),
            "--model".into(),
            file.clone().into(),
            "--threads".into(),
            p.threads.to_string().into(),
            "--decode-tokens".into(),
            decode_tokens.to_string().into(),
            "--prompt-tokens".into(),
            prompt_tokens.to_string().into(),
            "--reps".into(),
            reps.to_string().into(),
        ];
        let step = format!("bench of {key}");
        // Other work on the machine slows llama.cpp's spinning OpenMP threads most of all.
        if let Some(note) = load_note(key) {
            report.notes.push(note);
        }
        let got = script(&p.venv, &p.dir, &step, &args)
            .and_then(|out| parse_last_json::<BenchOut>(&step, &out))
            .and_then(|b| push_bench(report, key, &b));
        if let Err(e) = got {
            report.notes.push(format!("llama.cpp {key} failed: {e}"));
        }
    }
    push_ratios(report);
    report.notes.push(format!(
        "llama.cpp peer: {MODEL}'s text decoder as llama.cpp arch qwen3 (plain NeoX RoPE, no DeepStack: the same weights and FLOPs for text decode), random weights; decode after a short prompt, one token per llama_decode; prefill one llama_decode of the prompt"
    ));
}

/// The 1-minute load average before `key`'s run, flagged BUSY when other work holds more than
/// half the cores (decode figures then say more about the machine than about llama.cpp).
fn load_note(key: &str) -> Option<String> {
    let load = std::fs::read_to_string("/proc/loadavg").ok()?;
    let one_min: f64 = load.split_whitespace().next()?.parse().ok()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    Some(format!(
        "llama.cpp {key}: 1-minute load average {one_min:.2} before its run ({cores} cores){}",
        if one_min > cores as f64 * 0.5 {
            ": BUSY, the figures are not a quiet machine's"
        } else {
            ""
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SuiteReport {
        SuiteReport {
            suite: "e2e".into(),
            results: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The GGUF's shape is the catalog's 2B text decoder, with the parameter count the HF
    /// model of the same config has (1,720,574,976: measured with transformers on the
    /// random-weight Qwen3-VL-2B, text decoder and embedding), and the writer's arguments
    /// carry every dimension.
    #[test]
    fn gguf_shape_of_the_2b_text_decoder() {
        let cfg = vlmem_qwen3vl::catalog::config("qwen3-vl-2b").unwrap();
        let s = GgufShape::of(&cfg).unwrap();
        assert_eq!(
            (
                s.hidden,
                s.layers,
                s.heads,
                s.kv_heads,
                s.head_dim,
                s.intermediate,
                s.vocab
            ),
            (2048, 28, 16, 8, 128, 6144, 151_936)
        );
        assert!(s.tied);
        assert_eq!(s.params(), 1_720_574_976);
        let args: Vec<String> = s
            .write_args(Path::new("/x/m.gguf"), 7)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let value = |k: &str| {
            let i = args.iter().position(|a| a == k).unwrap();
            args[i + 1].clone()
        };
        assert_eq!(args[0], "write");
        assert_eq!(value("--out"), "/x/m.gguf");
        assert_eq!(value("--hidden"), "2048");
        assert_eq!(value("--layers"), "28");
        assert_eq!(value("--heads"), "16");
        assert_eq!(value("--kv-heads"), "8");
        assert_eq!(value("--head-dim"), "128");
        assert_eq!(value("--intermediate"), "6144");
        assert_eq!(value("--vocab"), "151936");
        assert_eq!(value("--context"), "262144");
        assert_eq!(value("--seed"), "7");
        assert_eq!(value("--tied"), "1");
        assert_eq!(value("--rope-theta").parse::<f64>().unwrap(), 5e6);
        assert_eq!(value("--rms-eps").parse::<f64>().unwrap(), 1e-6);
        // Every flag the script's `write` requires is given (its parser's list).
        for k in [
            "--out",
            "--hidden",
            "--layers",
            "--heads",
            "--kv-heads",
            "--head-dim",
            "--intermediate",
            "--vocab",
            "--context",
            "--seed",
            "--rope-theta",
            "--rms-eps",
            "--tied",
        ] {
            assert!(
                SCRIPT.contains(&format!("\"{}\"", k.trim_start_matches("--")))
                    || SCRIPT.contains(&format!("\"{k}\""))
            );
            assert!(args.iter().any(|a| a == k), "{k}");
        }
        // The fingerprint names the shape, not the path, and moves with the seed.
        assert_eq!(s.fingerprint(0), s.fingerprint(0));
        assert_ne!(s.fingerprint(0), s.fingerprint(1));
        assert!(!s.fingerprint(0).contains("m.gguf"));
    }

    /// An untied decoder writes its output projection too; a MoE decoder is refused.
    #[test]
    fn gguf_shape_untied_and_moe() {
        let cfg8 = vlmem_qwen3vl::catalog::config("qwen3-vl-8b").unwrap();
        let s8 = GgufShape::of(&cfg8).unwrap();
        assert!(!s8.tied);
        let tied = GgufShape {
            tied: true,
            ..s8.clone()
        };
        assert_eq!(s8.params() - tied.params(), s8.vocab * s8.hidden);
        let moe = vlmem_qwen3vl::catalog::config("qwen3-vl-30b-a3b").unwrap();
        assert!(matches!(
            GgufShape::of(&moe),
            Err(PeerError::Unsupported(_))
        ));
    }

    /// The script's output is read from its last line (whatever printed before it), the
    /// figures are the medians of the repetitions under the agreed names, and output that is
    /// not the promised object is a typed error.
    #[test]
    fn bench_output_becomes_named_figures() {
        let stdout = "llama_model_loader: loaded meta data\n\
            {\"model\": \"/c/m.gguf\", \"desc\": \"qwen3 1.7B BF16\", \"params\": 1720574976, \"model_bytes\": 3441416736, \"threads\": 2, \"load_s\": 0.4, \"prompt_tokens\": 512, \"decode_tokens\": 32, \"prefill_tok_s\": [80.0, 90.0, 70.0], \"decode_tok_s\": [14.0, 15.0, 13.0], \"decode_tok_s_llama\": [15.5, 15.0, 16.0], \"prefill_tok_s_median\": 80.0, \"decode_tok_s_median\": 14.0}\n\n";
        let b: BenchOut = parse_last_json("bench", stdout).unwrap();
        assert_eq!(b.threads, 2);
        let mut r = report();
        push_bench(&mut r, "bf16", &b).unwrap();
        assert_eq!(r.value("decode_tok_s.bf16@llama_cpp"), Some(14.0));
        assert_eq!(r.value("prefill_tok_s.bf16@llama_cpp"), Some(80.0));
        assert_eq!(r.value("decode_tok_s.bf16@llama_cpp_perf"), Some(15.5));
        assert_eq!(
            r.value("weight_bytes.bf16@llama_cpp"),
            Some(3_441_416_736.0)
        );
        // Even counts: the mean of the middle two.
        assert_eq!(median(&[1.0, 4.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());

        assert!(matches!(
            parse_last_json::<BenchOut>("bench", "Traceback ...\nValueError: x\n"),
            Err(PeerError::Output { .. })
        ));
        assert!(matches!(
            parse_last_json::<BenchOut>("bench", "  \n"),
            Err(PeerError::Output { .. })
        ));
        // A result missing a field is not taken for one.
        assert!(parse_last_json::<BenchOut>("bench", "{\"desc\": \"x\"}").is_err());
        // No positive speed: refused, nothing pushed.
        let zero = BenchOut {
            decode_tok_s: vec![0.0],
            ..b
        };
        let mut r = report();
        assert!(push_bench(&mut r, "q8_0", &zero).is_err());
        assert!(r.results.is_empty());

        let w: Written =
            parse_last_json("write", "{\"out\": \"a\", \"tensors\": 310, \"params\": 5, \"file_bytes\": 10, \"seconds\": 1.5}")
                .unwrap();
        assert_eq!(w.params, 5);
        let v: Versions = parse_last_json(
            "versions",
            "{\"python\": \"3.11.7\", \"gguf_error\": \"ModuleNotFoundError('gguf')\"}",
        )
        .unwrap();
        assert!(v.gguf.is_none() && v.llama_cpp_python.is_none());
    }

    /// Ratios come from whatever vlmem figures exist by name: the same name first, then the
    /// figure that stands for it; none when vlmem measured neither.
    #[test]
    fn ratios_from_the_vlmem_figures_that_exist() {
        let mut r = report();
        for (n, v) in [
            ("decode_tok_s.bf16@llama_cpp", 10.0),
            ("decode_tok_s.q8_0@llama_cpp", 20.0),
            ("prefill_tok_s.bf16@llama_cpp", 100.0),
            ("decode_tok_s.resident", 5.0),
        ] {
            push(&mut r, n, v, "tok/s");
        }
        push_ratios(&mut r);
        assert_eq!(r.value("decode_tok_s.bf16_over_llama_cpp"), Some(0.5));
        assert_eq!(r.value("decode_tok_s.q8_0_over_llama_cpp"), None);
        assert_eq!(r.value("prefill_tok_s.bf16_over_llama_cpp"), None);
        let table = peer_table(&r);
        assert_eq!(table.len(), 4, "{table:#?}");
        assert!(table[1].contains("decode_tok_s.resident") && table[1].contains("0.50"));
        assert!(table[2].contains("not measured"));

        // Once vlmem measures the figure of the same name, that one counts.
        let mut r2 = r.clone();
        r2.results.retain(|x| !x.name.ends_with("_over_llama_cpp"));
        push(&mut r2, "decode_tok_s.bf16", 15.0, "tok/s");
        push(&mut r2, "decode_tok_s.q8_0", 30.0, "tok/s");
        push_ratios(&mut r2);
        assert_eq!(r2.value("decode_tok_s.bf16_over_llama_cpp"), Some(1.5));
        assert_eq!(r2.value("decode_tok_s.q8_0_over_llama_cpp"), Some(1.5));

        // No llama.cpp figures: no table, no ratios.
        let mut plain = report();
        push(&mut plain, "decode_tok_s.resident", 5.0, "tok/s");
        push_ratios(&mut plain);
        assert_eq!(plain.results.len(), 1);
        assert!(peer_table(&plain).is_empty());
    }

    /// A Python that is not there, or a program that is not Python, is a typed error naming
    /// what to install, before anything is made; the folder is left without an environment.
    #[test]
    fn missing_python_is_a_typed_error() {
        let tmp = tempfile::tempdir().unwrap();
        let missing: OsString = tmp.path().join("no-such-python3").into();
        let e = ensure_venv(&missing, tmp.path()).unwrap_err();
        assert!(matches!(e, PeerError::PythonMissing { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("apt-get install python3 python3-venv python3-pip"),
            "{msg}"
        );
        assert!(msg.contains("VLMEM_PYTHON"), "{msg}");
        assert!(!tmp.path().join("venv").exists());
        // `false` runs but prints no version.
        let e = check_python(&OsString::from("false")).unwrap_err();
        assert!(matches!(e, PeerError::PythonMissing { .. }), "{e:?}");
    }

    /// AMX is left out of the build only where the CPU lists it and the kernel does not
    /// support its tiles; the flags survive CMAKE_ARGS' shell-style splitting as two defines.
    #[test]
    fn amx_left_out_only_where_it_faults() {
        let broken = CpuInfo {
            amx_advertised: true,
            amx_usable: Some(false),
        };
        let args = cmake_args(Some(broken));
        assert!(args.starts_with(CMAKE_ARGS));
        assert!(args.contains("-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"));
        // Quoted so that each define is one argument after shlex-style splitting.
        assert_eq!(args.matches('\'').count(), 4);
        for fine in [
            None,
            Some(CpuInfo {
                amx_advertised: true,
                amx_usable: Some(true),
            }),
            Some(CpuInfo {
                amx_advertised: true,
                amx_usable: None,
            }),
            Some(CpuInfo {
                amx_advertised: false,
                amx_usable: None,
            }),
        ] {
            assert_eq!(cmake_args(fine), CMAKE_ARGS, "{fine:?}");
        }
        assert_ne!(venv_marker_text(&args), venv_marker_text(CMAKE_ARGS));
        let cpu: CpuInfo =
            parse_last_json("cpu", "{\"amx_advertised\": true, \"amx_usable\": false}").unwrap();
        assert_eq!(cpu, broken);
    }

    /// The build's progress is read from pip's verbose log.
    #[test]
    fn build_progress_from_the_log() {
        let log = "  -- Configuring done\n  [26/140] /usr/bin/gcc -c ggml.c\n  warning: x\n";
        assert_eq!(
            build_step(log).as_deref(),
            Some("compiling llama.cpp, step 26 of 140")
        );
        assert_eq!(build_step("Collecting gguf\n[notice] pip\n"), None);
        // Brackets with a slash that are not step counts.
        assert_eq!(build_step("[notice/x] pip\n"), None);
        // The last step counts, whatever follows it.
        assert_eq!(
            build_step("[3/9] a\n[4/9] b\nwarning: c\n").as_deref(),
            Some("compiling llama.cpp, step 4 of 9")
        );
    }
}
