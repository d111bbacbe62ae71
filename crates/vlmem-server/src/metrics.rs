//! The server's own counters and the time-to-first-token histogram, written with the
//! backend's statistics as Prometheus text (`GET /metrics`).

use crate::backend::Backend;
use std::fmt::Write as _;
use std::time::Duration;
use vlmem_core::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds of the time-to-first-token buckets, seconds (a tiny model answers in
/// milliseconds, a large image on a laptop's CPU in minutes).
pub const TTFT_BUCKETS_S: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// A Prometheus histogram over fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one above every bound.
    counts: Vec<AtomicU64>,
    sum_us: AtomicU64,
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Counts one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            d.as_micros().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum {sum}");
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

/// The server's counters.
#[derive(Debug)]
pub struct Metrics {
    /// Requests answered, by status class: 2xx, 4xx, 5xx.
    pub responses: [AtomicU64; 3],
    /// Requests refused because the queue was full (429).
    pub rejected: AtomicU64,
    /// Prompt tokens of requests taken by the backend.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated (streamed or not, finished or not).
    pub generated_tokens: AtomicU64,
    /// Streams whose client went away before the end.
    pub disconnects: AtomicU64,
    /// From the request's arrival to its first generated token.
    pub ttft: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            responses: Default::default(),
            rejected: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            ttft: Histogram::new(&TTFT_BUCKETS_S),
        }
    }
}

impl Metrics {
    /// Counts a response by its status.
    pub fn count_status(&self, status: u16) {
        let i = match status {
            200..=399 => 0,
            400..=499 => 1,
            _ => 2,
        };
        self.responses[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Everything, the backend's statistics included (`None` while the model loads).
    pub fn render(&self, backend: Option<&dyn Backend>) -> String {
        let mut out = String::new();
        let load = backend.map(|b| b.load()).unwrap_or_default();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            );
        };
        gauge(
            &mut out,
            "vlmem_server_ready",
            "1 once the model is loaded",
            backend.is_some() as u64,
        );
        gauge(
            &mut out,
            "vlmem_server_requests_running",
            "requests being generated",
            load.running as u64,
        );
        gauge(
            &mut out,
            "vlmem_server_requests_queued",
            "requests waiting for the engine",
            load.queued as u64,
        );
        gauge(
            &mut out,
            "vlmem_server_max_queue",
            "the most requests that may wait (--max-queue)",
            load.max_queue as u64,
        );
        counter(
            &mut out,
            "vlmem_server_requests_rejected_total",
            "requests refused with 429 because the queue was full",
            self.rejected.load(Ordering::Relaxed),
        );
        let name = "vlmem_server_responses_total";
        let _ = write!(
            out,
            "# HELP {name} responses by status class\n# TYPE {name} counter\n"
        );
        for (i, class) in ["2xx", "4xx", "5xx"].iter().enumerate() {
            let v = self.responses[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}{{status=\"{class}\"}} {v}");
        }
        counter(
            &mut out,
            "vlmem_server_prompt_tokens_total",
            "prompt tokens of the requests taken",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "vlmem_server_generated_tokens_total",
            "tokens generated",
            self.generated_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "vlmem_server_disconnects_total",
            "requests whose client went away before the end",
            self.disconnects.load(Ordering::Relaxed),
        );
        self.ttft.write(
            &mut out,
            "vlmem_server_time_to_first_token_seconds",
            "from a request's arrival to its first generated token",
        );
        if let Some(b) = backend {
            b.write_metrics(&mut out);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative() {
        let h = Histogram::new(&TTFT_BUCKETS_S);
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(70));
        h.observe(Duration::from_secs(1000));
        let mut out = String::new();
        h.write(&mut out, "t", "help");
        assert!(out.contains("t_bucket{le=\"0.005\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"0.1\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"300\"} 2\n"), "{out}");
        assert!(out.contains("t_bucket{le=\"+Inf\"} 3\n"), "{out}");
        assert!(out.contains("t_count 3\n"), "{out}");
        assert_eq!(h.count(), 3);
    }

    #[test]
    fn render_without_a_backend_says_not_ready() {
        let m = Metrics::default();
        m.count_status(429);
        let text = m.render(None);
        assert!(text.contains("vlmem_server_ready 0\n"));
        assert!(text.contains("vlmem_server_responses_total{status=\"4xx\"} 1\n"));
    }
}
