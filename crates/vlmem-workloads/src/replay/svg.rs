//! Tier occupancy over time: a sampler thread and a hand-written SVG (three stacked-area
//! panels, device / host / disk, one colour per tensor kind).

use serde::Serialize;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use vlmem::MemoryManager;
use vlmem_core::sync::Arc;
use vlmem_core::sync::atomic::{AtomicBool, Ordering};

/// Resident bytes per tier and kind at one instant.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OccupancySample {
    /// Seconds since the replay started.
    pub t_s: f64,
    /// `bytes[tier][kind]`.
    pub bytes: [[u64; 5]; 3],
}

pub(crate) struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<OccupancySample>>,
}

impl Sampler {
    pub(crate) fn start(m: &MemoryManager, every: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let m = m.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut out = Vec::new();
            loop {
                let done = flag.load(Ordering::Acquire);
                let s = m.stats();
                out.push(OccupancySample {
                    t_s: t0.elapsed().as_secs_f64(),
                    bytes: s.resident.bytes,
                });
                if done {
                    break;
                }
                std::thread::sleep(every);
            }
            // At most 2,000 points: keep every n-th.
            let n = out.len().div_ceil(2000).max(1);
            let last = out.last().copied();
            let mut kept: Vec<_> = out.into_iter().step_by(n).collect();
            if let (Some(l), Some(k)) = (last, kept.last())
                && k.t_s < l.t_s
            {
                kept.push(l);
            }
            kept
        });
        Sampler { stop, thread }
    }

    pub(crate) fn stop(self) -> Vec<OccupancySample> {
        self.stop.store(true, Ordering::Release);
        self.thread.join().unwrap_or_default()
    }
}

const KIND_NAMES: [&str; 5] = [
    "weight",
    "kv_cache",
    "activation",
    "vision_embedding",
    "scratch",
];
const KIND_COLOURS: [&str; 5] = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#9c755f"];
const TIER_NAMES: [&str; 3] = ["device (L1)", "host (L2)", "disk (L3)"];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart: one panel per tier, its capacity as the top of the y axis, the bytes of each
/// kind stacked, time on the x axis.
pub fn render_svg(samples: &[OccupancySample], capacity_bytes: [u64; 3], title: &str) -> String {
    let (w, panel_h, left, right, top, gap) = (900.0, 170.0, 80.0, 170.0, 58.0, 40.0);
    let plot_w = w - left - right;
    let h = top + 3.0 * (panel_h + gap) + 10.0;
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(1e-6);
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{left}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        esc(title)
    );
    for tier in 0..3 {
        let y0 = top + tier as f64 * (panel_h + gap);
        let cap = capacity_bytes[tier].max(1) as f64;
        let peak = samples
            .iter()
            .map(|s| s.bytes[tier].iter().sum::<u64>())
            .max()
            .unwrap_or(0) as f64;
        let ymax = cap.max(peak).max(1.0);
        let x = |t: f64| left + plot_w * t / t_max;
        let y = |b: f64| y0 + panel_h - panel_h * b / ymax;
        let _ = writeln!(
            o,
            r##"<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel_h}" fill="#fafafa" stroke="#888"/>"##
        );
        let _ = writeln!(
            o,
            r#"<text x="{left}" y="{}" font-weight="bold">{} — capacity {:.1} MiB</text>"#,
            y0 - 6.0,
            TIER_NAMES[tier],
            cap / (1u64 << 20) as f64
        );
        // Stacked areas, kind by kind.
        let mut below = vec![0u64; samples.len()];
        for kind in 0..5 {
            if samples.iter().all(|s| s.bytes[tier][kind] == 0) {
                continue;
            }
            let mut pts = String::new();
            for (i, s) in samples.iter().enumerate() {
                let top_b = below[i] + s.bytes[tier][kind];
                let _ = write!(pts, "{:.1},{:.1} ", x(s.t_s), y(top_b as f64));
            }
            for (i, s) in samples.iter().enumerate().rev() {
                let _ = write!(pts, "{:.1},{:.1} ", x(s.t_s), y(below[i] as f64));
            }
            let _ = writeln!(
                o,
                r#"<polygon points="{}" fill="{}" fill-opacity="0.85" stroke="none"><title>{}</title></polygon>"#,
                pts.trim_end(),
                KIND_COLOURS[kind],
                KIND_NAMES[kind]
            );
            for (i, s) in samples.iter().enumerate() {
                below[i] += s.bytes[tier][kind];
            }
        }
        // Capacity line and y labels.
        let yc = y(cap);
        let _ = writeln!(
            o,
            r##"<line x1="{left}" y1="{yc:.1}" x2="{}" y2="{yc:.1}" stroke="#d00" stroke-dasharray="4 3"/>"##,
            left + plot_w
        );
        for frac in [0.0, 0.5, 1.0] {
            let b = ymax * frac;
            let _ = writeln!(
                o,
                r#"<text x="{}" y="{:.1}" text-anchor="end">{:.1} MiB</text>"#,
                left - 6.0,
                y(b) + 4.0,
                b / (1u64 << 20) as f64
            );
        }
        let _ = writeln!(
            o,
            r#"<text x="{}" y="{}" text-anchor="end">{:.2} s</text>"#,
            left + plot_w,
            y0 + panel_h + 14.0,
            t_max
        );
        let _ = writeln!(
            o,
            r#"<text x="{left}" y="{}">0 s</text>"#,
            y0 + panel_h + 14.0
        );
    }
    // Legend.
    for (k, name) in KIND_NAMES.iter().enumerate() {
        let ly = top + 10.0 + k as f64 * 20.0;
        let lx = w - right + 15.0;
        let _ = writeln!(
            o,
            r#"<rect x="{lx}" y="{ly}" width="12" height="12" fill="{}"/><text x="{}" y="{}">{name}</text>"#,
            KIND_COLOURS[k],
            lx + 18.0,
            ly + 11.0
        );
    }
    let _ = writeln!(
        o,
        r##"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="#d00" stroke-dasharray="4 3"/><text x="{}" y="{}">capacity</text>"##,
        w - right + 15.0,
        top + 116.0,
        w - right + 27.0,
        top + 116.0,
        w - right + 33.0,
        top + 120.0
    );
    o.push_str("</svg>\n");
    o
}
