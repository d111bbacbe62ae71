//! llama.cpp's batched decode beside the scheduler's (`vlmem bench serve --peers`): the
//! BF16 GGUF of the same text decoder that `vlmem bench e2e --peers` writes, through the same
//! Python environment (the script's `serve` command: llama-cpp-python's low-level API,
//! `llama_batch_init` and one `llama_decode` of one token per sequence per step), the same
//! thread count, prompt length and generated tokens.

use super::{CONCURRENCY, PROMPT_TOKENS, progress, push};
use crate::SuiteReport;
use crate::e2e::peers::{self as e2e_peers, PEER, PeerError, Prepared, parse_last_json};
use serde::Deserialize;
use std::ffi::OsString;

/// The figures set against llama.cpp's (`FIGURE@llama_cpp`), each by the vlmem figure of
/// the same name.
pub(crate) const SERVE_FIGURES: [(&str, &[&str]); 6] = [
    ("serve_tok_s.resident@1", &["serve_tok_s.resident@1"]),
    ("serve_tok_s.resident@4", &["serve_tok_s.resident@4"]),
    ("serve_tok_s.resident@16", &["serve_tok_s.resident@16"]),
    ("serve_tok_s.streamed@1", &["serve_tok_s.streamed@1"]),
    ("serve_tok_s.streamed@4", &["serve_tok_s.streamed@4"]),
    ("serve_tok_s.streamed@16", &["serve_tok_s.streamed@16"]),
];

/// What the script's `serve` reports.
#[derive(Debug, Deserialize, PartialEq)]
pub(crate) struct ServeOut {
    pub(crate) desc: String,
    pub(crate) model_bytes: u64,
    pub(crate) threads: usize,
    pub(crate) n_ctx: u64,
    pub(crate) kv_unified: bool,
    #[serde(default)]
    pub(crate) evicted: bool,
    pub(crate) load_s: f64,
    pub(crate) warmup_s: f64,
    pub(crate) prompt_tokens: usize,
    pub(crate) gen_tokens: usize,
    pub(crate) ids_agree: bool,
    pub(crate) runs: Vec<ServeRun>,
    pub(crate) peak_rss_bytes: u64,
}

/// One run of N sequences.
#[derive(Debug, Deserialize, PartialEq, Clone)]
pub(crate) struct ServeRun {
    pub(crate) seqs: usize,
    pub(crate) rep: usize,
    pub(crate) prefill_s: f64,
    pub(crate) decode_s: f64,
    pub(crate) decode_rows: u64,
    pub(crate) wall_s: f64,
}

impl ServeRun {
    /// S_TG: rows over the decode calls' time (recomputed, not the script's).
    fn tok_s(&self) -> Option<f64> {
        (self.decode_rows > 0 && self.decode_s > 0.0)
            .then(|| self.decode_rows as f64 / self.decode_s)
    }

    /// Every generated id (first tokens included) over the run's wall time.
    fn e2e_tok_s(&self, gen_tokens: usize) -> Option<f64> {
        (self.wall_s > 0.0).then(|| (self.seqs * gen_tokens) as f64 / self.wall_s)
    }
}

/// The script's `serve` of the BF16 file for `label`'s figures, run through `launcher`
/// (empty: directly); `evict` drops the file from the page cache first (for a run held in a
/// memory cgroup, which must read it itself).
pub(crate) fn run(
    p: &Prepared,
    label: &str,
    launcher: &[OsString],
    gen_tokens: usize,
    reps: usize,
    evict: bool,
) -> Result<ServeOut, PeerError> {
    let Some((_, file)) = p.files.iter().find(|(k, _)| *k == "bf16") else {
        return Err(PeerError::Unsupported(
            "a serve run without the BF16 GGUF".into(),
        ));
    };
    let seqs: Vec<String> = CONCURRENCY.iter().map(|n| n.to_string()).collect();
    let args: Vec<OsString> = vec![
        "serve".into(),
        "--model".into(),
        file.clone().into(),
        "--threads".into(),
        p.threads.to_string().into(),
        "--seqs".into(),
        seqs.join(",").into(),
        "--prompt-tokens".into(),
        PROMPT_TOKENS.to_string().into(),
        "--gen-tokens".into(),
        gen_tokens.to_string().into(),
        "--reps".into(),
        reps.to_string().into(),
        "--evict".into(),
        u8::from(evict).to_string().into(),
    ];
    progress(&format!(
        "llama.cpp {label}: {} at {} sequences, {gen_tokens} tokens each, {reps} rep(s), {} threads",
        file.display(),
        seqs.join("/"),
        p.threads
    ));
    let step = format!("serve ({label})");
    let out = e2e_peers::script_launched(launcher, &p.venv, &p.dir, &step, &args)?;
    parse_last_json(&step, &out)
}

/// llama.cpp's figures of `label` into `report`: for each N the best repetition's
/// `serve_tok_s.LABEL@N@llama_cpp` (S_TG) and `serve_e2e_tok_s.LABEL@N@llama_cpp`, its peak
/// resident set, and a note with every run.
pub(crate) fn push_figures(report: &mut SuiteReport, label: &str, out: &ServeOut) {
    let mut per_n = Vec::new();
    for n in CONCURRENCY {
        let runs: Vec<&ServeRun> = out.runs.iter().filter(|r| r.seqs == n).collect();
        let best = runs
            .iter()
            .filter_map(|r| r.tok_s())
            .fold(f64::NAN, f64::max);
        let best_e2e = runs
            .iter()
            .filter_map(|r| r.e2e_tok_s(out.gen_tokens))
            .fold(f64::NAN, f64::max);
        if best.is_finite() {
            push(
                report,
                &format!("serve_tok_s.{label}@{n}{PEER}"),
                best,
                "tok/s",
            );
        }
        if best_e2e.is_finite() {
            push(
                report,
                &format!("serve_e2e_tok_s.{label}@{n}{PEER}"),
                best_e2e,
                "tok/s",
            );
        }
        let all: Vec<String> = runs
            .iter()
            .map(|r| format!("{:.3}", r.tok_s().unwrap_or(f64::NAN)))
            .collect();
        per_n.push(format!("@{n} [{}]", all.join(", ")));
    }
    push(
        report,
        &format!("serve_peak_rss_bytes.{label}{PEER}"),
        out.peak_rss_bytes as f64,
        "B",
    );
    report.notes.push(format!(
        "llama.cpp {label}: {} ({:.3} GB), {} threads, n_ctx {} ({} KV), page cache {}, loaded in {:.2} s, warm-up {:.1} s; decode tok/s of each repetition {}; each sequence got the same ids at every N: {}",
        out.desc,
        out.model_bytes as f64 / 1e9,
        out.threads,
        out.n_ctx,
        if out.kv_unified { "unified" } else { "per-sequence" },
        if out.evicted { "emptied of the file first" } else { "as found" },
        out.load_s,
        out.warmup_s,
        per_n.join(", "),
        out.ids_agree,
    ));
}

/// `FIGURE_over_llama_cpp` = vlmem / llama.cpp for every figure of [`SERVE_FIGURES`] both
/// measured.
pub(crate) fn push_ratios(report: &mut SuiteReport) {
    e2e_peers::push_ratios_of(report, &SERVE_FIGURES);
}

/// The table of llama.cpp's figures beside vlmem's (empty when there are none).
pub fn peer_table(report: &SuiteReport) -> Vec<String> {
    e2e_peers::table_of(e2e_peers::pairs_of(report, &SERVE_FIGURES))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SuiteReport {
        SuiteReport {
            suite: "serve".into(),
            results: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// The script's output becomes the best repetition's figures under the agreed names,
    /// and the ratios and the table come from the vlmem figures of the same names.
    #[test]
    fn serve_output_becomes_named_figures_and_ratios() {
        let stdout = "llama_context: n_ctx = 768\n\
            {\"model\": \"m.gguf\", \"desc\": \"qwen3 1.7B BF16\", \"model_bytes\": 3441397760, \"threads\": 2, \"n_ctx\": 768, \"n_batch\": 256, \"kv_unified\": true, \"evicted\": false, \"load_s\": 0.1, \"warmup_s\": 2.0, \"prompt_tokens\": 16, \"gen_tokens\": 8, \"ids_agree\": true, \"peak_rss_bytes\": 3600000000, \"runs\": [\
            {\"seqs\": 1, \"rep\": 0, \"prefill_s\": 0.4, \"decode_s\": 1.4, \"decode_rows\": 7, \"steps\": 7, \"wall_s\": 1.8, \"tok_s\": 5.0},\
            {\"seqs\": 4, \"rep\": 0, \"prefill_s\": 1.2, \"decode_s\": 1.4, \"decode_rows\": 28, \"steps\": 7, \"wall_s\": 2.6, \"tok_s\": 20.0},\
            {\"seqs\": 16, \"rep\": 0, \"prefill_s\": 5.0, \"decode_s\": 4.0, \"decode_rows\": 112, \"steps\": 7, \"wall_s\": 9.0, \"tok_s\": 28.0},\
            {\"seqs\": 16, \"rep\": 1, \"prefill_s\": 5.0, \"decode_s\": 3.5, \"decode_rows\": 112, \"steps\": 7, \"wall_s\": 8.0, \"tok_s\": 32.0},\
            {\"seqs\": 1, \"rep\": 1, \"prefill_s\": 0.4, \"decode_s\": 2.8, \"decode_rows\": 7, \"steps\": 7, \"wall_s\": 3.2, \"tok_s\": 2.5}]}\n";
        let out: ServeOut = parse_last_json("serve", stdout).unwrap();
        let mut r = report();
        push_figures(&mut r, "resident", &out);
        assert_eq!(r.value("serve_tok_s.resident@1@llama_cpp"), Some(5.0));
        assert_eq!(r.value("serve_tok_s.resident@4@llama_cpp"), Some(20.0));
        assert_eq!(r.value("serve_tok_s.resident@16@llama_cpp"), Some(32.0));
        assert_eq!(
            r.value("serve_e2e_tok_s.resident@16@llama_cpp"),
            Some(16.0 * 8.0 / 8.0)
        );
        assert_eq!(
            r.value("serve_peak_rss_bytes.resident@llama_cpp"),
            Some(3.6e9)
        );
        assert!(r.value("serve_tok_s.streamed@1@llama_cpp").is_none());
        push(&mut r, "serve_tok_s.resident@16", 48.0, "tok/s");
        push(&mut r, "serve_tok_s.resident@1", 6.0, "tok/s");
        push_ratios(&mut r);
        assert_eq!(r.value("serve_tok_s.resident@16_over_llama_cpp"), Some(1.5));
        assert_eq!(r.value("serve_tok_s.resident@1_over_llama_cpp"), Some(1.2));
        assert_eq!(r.value("serve_tok_s.resident@4_over_llama_cpp"), None);
        let table = peer_table(&r);
        assert_eq!(table.len(), 4, "{table:#?}");
        assert!(table[3].contains("serve_tok_s.resident@16") && table[3].contains("1.50"));
        assert!(table[2].contains("not measured"));
        // A result missing its runs is not taken for one.
        assert!(parse_last_json::<ServeOut>("serve", "{\"desc\": \"x\"}").is_err());
    }
}
