//! The chart (`--svg`): one group of bars per cell, a bar per system, in two panels sharing the
//! cells along the x axis.
//!
//! ```text
//!   title, what was measured, legend
//!   ┌ median IOPS, log scale ────────────────────────────┐
//!   │   ▆ ▃ █      ▆ ▂ ▇      ...    value above each bar │
//!   └─────────────────────────────────────────────────────┘
//!     tmpfs · randread   null · randread                    cell labels
//!     iodepth 1 · 1 queue ...
//!   ┌ CPU s per million I/Os, log scale ─────────────────┐
//!   │   dark: backend; whole bar: backend + load generator │
//!   └─────────────────────────────────────────────────────┘
//! ```
//!
//! Plain SVG 1.1 written as text: no scripts, no CSS, no external fonts, so browsers, rsvg and
//! image viewers draw it alike. Each panel is a `<g class="panel" data-panel="iops|cpu">`, each
//! cell a `<g class="cell" data-cell="...">` in it, each bar a `<rect class="bar"
//! data-system="..." data-value="...">` with a `<title>` (the tooltip); the smoke test reads the
//! chart back through these. A system that did not run in a cell (io_uring on null, fio off the
//! disk) gets an "n/a" where its bar would be. A cell with several VMs says how many under its
//! group, and its IOPS tooltips give Jain's index.

use std::fmt::Write;

use crate::report::Row;
use crate::systems::System;
use crate::{Cell, Rate};

const MARGIN_LEFT: f64 = 64.0;
const MARGIN_RIGHT: f64 = 16.0;
const BAR: f64 = 20.0;
const BAR_GAP: f64 = 3.0;
/// Space between two groups of bars.
const GROUP_PAD: f64 = 26.0;
/// A group is at least this wide, so its label fits.
const GROUP_MIN: f64 = 128.0;
const PANEL_HEIGHT: f64 = 250.0;
/// Room above the tallest bar for its value, written upwards.
const HEADROOM: f64 = 44.0;
const LABEL_LINES: usize = 3;
const LINE: f64 = 13.0;

/// The fill of each system's bars.
fn color(system: System) -> &'static str {
    match system {
        System::Vublk => "#2563eb",
        System::VublkSingle => "#7c3aed",
        System::VublkQos => "#0891b2",
        System::Qsd => "#ea580c",
        System::IoUring => "#059669",
        System::Fio => "#6b7280",
        System::RbdBench => "#b45309",
    }
}

/// Escapes text for XML character data and attribute values.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `v` in millions ("M"), thousands ("k") or units, whichever keeps it below 1000.
fn scaled(v: f64) -> (f64, &'static str) {
    if v >= 1e6 {
        (v / 1e6, "M")
    } else if v >= 1e3 {
        (v / 1e3, "k")
    } else {
        (v, "")
    }
}

/// A number as a short label: 1.84M, 182k, 7.67k, 88.7, 0.53.
fn short(v: f64) -> String {
    let (x, unit) = scaled(v);
    let s = if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    };
    format!("{s}{unit}")
}

/// A log-scale axis from `lo` to `hi` (powers of ten) over a panel `height` px tall at `top`.
struct LogAxis {
    lo: f64,
    hi: f64,
    top: f64,
    height: f64,
}

impl LogAxis {
    /// An axis holding `values` (positive, finite ones), with `HEADROOM` above the largest.
    fn new(values: impl Iterator<Item = f64>, top: f64, height: f64) -> LogAxis {
        let (mut min, mut max) = (f64::INFINITY, 0.0f64);
        for v in values.filter(|v| v.is_finite() && *v > 0.0) {
            min = min.min(v);
            max = max.max(v);
        }
        if max == 0.0 {
            (min, max) = (1.0, 10.0);
        }
        let lo = 10f64.powf(min.log10().floor());
        // The top is the first of 1, 2, 5 × 10^k past the largest value that leaves the room.
        let mut axis = LogAxis {
            lo,
            hi: lo,
            top,
            height,
        };
        let mut decade = lo;
        loop {
            for m in [1.0, 2.0, 5.0] {
                axis.hi = decade * m;
                if axis.hi >= lo * 10.0 && axis.hi >= max && axis.y(max) - top >= HEADROOM {
                    return axis;
                }
            }
            decade *= 10.0;
        }
    }

    fn y(&self, v: f64) -> f64 {
        let f = (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10());
        self.top + self.height * (1.0 - f.clamp(0.0, 1.0))
    }

    fn bottom(&self) -> f64 {
        self.top + self.height
    }

    /// Horizontal grid lines: every power of ten labelled, 2× and 5× faint (the top labelled).
    fn grid(&self, out: &mut String, left: f64, right: f64) {
        let mut decade = self.lo;
        while decade <= self.hi * 1.0001 {
            for (m, major) in [(1.0, true), (2.0, false), (5.0, false)] {
                let v = decade * m;
                if v > self.hi * 1.0001 {
                    break;
                }
                let y = self.y(v);
                let (stroke, width) = if major {
                    ("#9ca3af", 1.0)
                } else {
                    ("#e5e7eb", 0.8)
                };
                let _ = writeln!(
                    out,
                    r##"<line x1="{left:.1}" y1="{y:.1}" x2="{right:.1}" y2="{y:.1}" stroke="{stroke}" stroke-width="{width}"/>"##
                );
                if major || v >= self.hi * 0.9999 {
                    let _ = writeln!(
                        out,
                        r##"<text x="{:.1}" y="{:.1}" font-size="11" text-anchor="end" fill="#374151">{}</text>"##,
                        left - 6.0,
                        y + 4.0,
                        tick(v)
                    );
                }
            }
            decade *= 10.0;
        }
    }
}

/// The three lines under a group of bars.
fn cell_label(c: &Cell) -> [String; LABEL_LINES] {
    let queues = if c.queues == 1 { "queue" } else { "queues" };
    let third = match c.rate {
        Rate::Max => c.client.to_string(),
        Rate::Iops(n) => format!("{} · {} IOPS", c.client, tick(f64::from(n))),
    };
    let vms = if c.vms > 1 {
        format!(" · {} VMs", c.vms)
    } else {
        String::new()
    };
    [
        format!("{} · {}", c.medium, c.rw),
        format!("iodepth {} · {} {queues}{vms}", c.iodepth, c.queues),
        third,
    ]
}

/// A tick label: 1, 10, 100, 1k, 10k, 1M, 0.1.
fn tick(v: f64) -> String {
    let (x, unit) = scaled(v);
    format!("{}{unit}", (x * 1000.0).round() / 1000.0)
}

/// Roughly how wide `text` is in DejaVu Sans at `size` px (an average glyph is 0.6 em), so the
/// canvas can be made wide enough for its headings.
fn text_width(text: &str, size: f64) -> f64 {
    text.chars().count() as f64 * size * 0.6
}

/// One bar panel: the frame, the grid, a group of bars per cell, the cell labels below.
struct Panel {
    name: &'static str,
    heading: &'static str,
    /// A second, smaller line under the heading.
    key: String,
    axis: LogAxis,
}

/// The chart of `rows` (medians, as from `report::summarize`), titled `title`, with the lines of
/// `subtitle` under it (what was measured, on what).
pub fn chart(rows: &[Row], title: &str, subtitle: &[String]) -> String {
    let mut cells: Vec<Cell> = Vec::new();
    let mut systems: Vec<System> = Vec::new();
    for r in rows {
        if !cells.contains(&r.cell) {
            cells.push(r.cell);
        }
        if !systems.contains(&r.system) {
            systems.push(r.system);
        }
    }
    let n = systems.len().max(1) as f64;
    let bars_width = n * BAR + (n - 1.0) * BAR_GAP;
    let group = (bars_width + GROUP_PAD).max(GROUP_MIN);
    let plot_width = group * cells.len().max(1) as f64;
    let right = MARGIN_LEFT + plot_width;

    let find = |c: &Cell, s: System| rows.iter().find(|r| r.cell == *c && r.system == s);
    let labels_height = LABEL_LINES as f64 * LINE + 10.0;
    let subtitle_bottom = 44.0 + 15.0 * subtitle.len().saturating_sub(1) as f64;
    let legend_y = subtitle_bottom + 22.0;
    let panel1_top = legend_y + 58.0;
    let panel2_top = panel1_top + PANEL_HEIGHT + labels_height + 56.0;
    let height = panel2_top + PANEL_HEIGHT + labels_height + 12.0;
    let panels = [
        Panel {
            name: "iops",
            heading: "Median IOPS (log scale; higher is better)",
            key: format!(
                "completions in the measured window per second, median over the rounds{}",
                if cells.iter().any(|c| c.rate != Rate::Max) {
                    "; dashed: the rate asked for"
                } else {
                    ""
                }
            ),
            // The rates asked for too: each paced group gets a line at its rate.
            axis: LogAxis::new(
                rows.iter()
                    .flat_map(|r| [r.iops, r.cell.rate.iops().map_or(0.0, f64::from)]),
                panel1_top,
                PANEL_HEIGHT,
            ),
        },
        Panel {
            name: "cpu",
            heading: "CPU seconds per million I/Os (log scale; lower is better)",
            key: "solid: the backend's processes; pale: the load generator (client); \
                  the top of the bar: both (io_uring has no backend)"
                .to_string(),
            axis: LogAxis::new(
                rows.iter()
                    .flat_map(|r| [r.total_cpu_per_mio, r.backend_cpu_per_mio]),
                panel2_top,
                PANEL_HEIGHT,
            ),
        },
    ];

    // Wide enough for the bars and for every heading.
    let texts = [(title, 17.0)]
        .into_iter()
        .chain(subtitle.iter().map(|s| (s.as_str(), 12.0)))
        .chain(
            panels
                .iter()
                .flat_map(|p| [(p.heading, 12.0), (p.key.as_str(), 11.0)]),
        );
    let widest = texts
        .map(|(t, size)| text_width(t, size))
        .fold(0.0, f64::max);
    let width = (MARGIN_LEFT + plot_width.max(widest) + MARGIN_RIGHT).ceil();

    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" version="1.1" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="DejaVu Sans, Verdana, Arial, sans-serif">
<title>{}</title>
<rect x="0" y="0" width="{width:.0}" height="{height:.0}" fill="#ffffff"/>
<text x="{MARGIN_LEFT}" y="24" font-size="17" font-weight="bold" fill="#111827">{}</text>"##,
        esc(title),
        esc(title),
    );
    for (i, line) in subtitle.iter().enumerate() {
        let _ = writeln!(
            out,
            r##"<text x="{MARGIN_LEFT}" y="{}" font-size="12" fill="#4b5563">{}</text>"##,
            44 + 15 * i,
            esc(line)
        );
    }
    // The legend, one swatch per system.
    let mut x = MARGIN_LEFT;
    let _ = writeln!(out, r##"<g class="legend">"##);
    for s in &systems {
        let _ = writeln!(
            out,
            r##"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}" font-size="12" fill="#111827">{}</text>"##,
            legend_y - 10.0,
            color(*s),
            x + 16.0,
            legend_y,
            esc(s.name())
        );
        x += 16.0 + text_width(s.name(), 12.0) + 20.0;
    }
    let _ = writeln!(out, "</g>");

    for (pi, p) in panels.iter().enumerate() {
        let axis = &p.axis;
        let _ = writeln!(out, r##"<g class="panel" data-panel="{}">"##, p.name);
        let _ = writeln!(
            out,
            r##"<text x="{MARGIN_LEFT}" y="{:.1}" font-size="12" font-weight="bold" fill="#111827">{}</text>
<text x="{MARGIN_LEFT}" y="{:.1}" font-size="11" fill="#4b5563">{}</text>"##,
            axis.top - 26.0,
            esc(p.heading),
            axis.top - 11.0,
            esc(&p.key)
        );
        axis.grid(&mut out, MARGIN_LEFT, right);
        for (ci, c) in cells.iter().enumerate() {
            let gx = MARGIN_LEFT + ci as f64 * group;
            let _ = writeln!(
                out,
                r##"<g class="cell" data-cell="{}">"##,
                esc(&c.to_string())
            );
            let first = gx + (group - bars_width) / 2.0;
            for (si, s) in systems.iter().enumerate() {
                let bx = first + si as f64 * (BAR + BAR_GAP);
                let mid = bx + BAR / 2.0;
                let (value, inner) = match (find(c, *s), pi) {
                    (Some(r), 0) => (r.iops, None),
                    (Some(r), _) => (r.total_cpu_per_mio, Some(r.backend_cpu_per_mio)),
                    (None, _) => (f64::NAN, None),
                };
                if !(value.is_finite() && value > 0.0) {
                    let _ = writeln!(
                        out,
                        r##"<text x="{mid:.1}" y="{:.1}" font-size="9" text-anchor="middle" fill="#6b7280">n/a</text>"##,
                        axis.bottom() - 4.0
                    );
                    continue;
                }
                let top = axis.y(value);
                let fairness = match find(c, *s).map(|r| r.jain) {
                    Some(j) if j.is_finite() => format!(", Jain's index {j:.3}"),
                    _ => String::new(),
                };
                let tip = match (pi, inner) {
                    (0, _) => format!("{}: {value:.0} IOPS{fairness}", s.name()),
                    (_, Some(b)) if b.is_finite() => {
                        format!("{}: {value:.2} CPU s per M I/O ({b:.2} backend)", s.name())
                    }
                    _ => format!("{}: {value:.2} CPU s per M I/O (load generator)", s.name()),
                };
                // In the CPU panel the whole bar is pale and the backend's part solid.
                let opacity = if pi == 0 { 1.0 } else { 0.4 };
                let _ = writeln!(
                    out,
                    r##"<rect class="bar" data-system="{}" data-value="{value}" x="{bx:.1}" y="{top:.1}" width="{BAR}" height="{:.1}" fill="{}" fill-opacity="{opacity}"><title>{}</title></rect>"##,
                    esc(s.name()),
                    axis.bottom() - top,
                    color(*s),
                    esc(&tip)
                );
                if let Some(b) = inner.filter(|b| b.is_finite() && *b > 0.0) {
                    let btop = axis.y(b);
                    let _ = writeln!(
                        out,
                        r##"<rect class="backend" x="{bx:.1}" y="{btop:.1}" width="{BAR}" height="{:.1}" fill="{}"/>"##,
                        axis.bottom() - btop,
                        color(*s)
                    );
                }
                // The value, written upwards from just above the bar.
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#111827" transform="rotate(-90 {:.1} {:.1})">{}</text>"##,
                    mid + 3.5,
                    top - 4.0,
                    mid + 3.5,
                    top - 4.0,
                    short(value)
                );
            }
            if let (0, Rate::Iops(rate)) = (pi, c.rate) {
                // The rate asked for, across the group: a bar below it fell short.
                let y = axis.y(f64::from(rate));
                let _ = writeln!(
                    out,
                    r##"<line class="rate" x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#111827" stroke-width="1.2" stroke-dasharray="5 3"><title>rate asked for: {rate} IOPS</title></line>"##,
                    first - 5.0,
                    first + bars_width + 5.0,
                );
            }
            for (li, line) in cell_label(c).iter().enumerate() {
                let _ = writeln!(
                    out,
                    r##"<text x="{:.1}" y="{:.1}" font-size="10.5" text-anchor="middle" fill="#374151">{}</text>"##,
                    gx + group / 2.0,
                    axis.bottom() + 15.0 + li as f64 * LINE,
                    esc(line)
                );
            }
            let _ = writeln!(out, "</g>");
        }
        // The axis line and the separators between the groups.
        let _ = writeln!(
            out,
            r##"<line x1="{MARGIN_LEFT}" y1="{0:.1}" x2="{right:.1}" y2="{0:.1}" stroke="#111827" stroke-width="1"/>
<line x1="{MARGIN_LEFT}" y1="{1:.1}" x2="{MARGIN_LEFT}" y2="{0:.1}" stroke="#111827" stroke-width="1"/>"##,
            axis.bottom(),
            axis.top
        );
        for ci in 1..cells.len() {
            let x = MARGIN_LEFT + ci as f64 * group;
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#d1d5db" stroke-dasharray="3 3"/>"##,
                axis.top,
                axis.bottom() + labels_height
            );
        }
        let _ = writeln!(out, "</g>");
    }
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Medium;
    use crate::{ClientMode, Rw};

    fn row(medium: Medium, system: System, iops: f64) -> Row {
        Row {
            cell: Cell {
                medium,
                rw: Rw::RandRead,
                iodepth: 32,
                queues: 1,
                client: ClientMode::Interrupt,
                rate: Rate::Max,
                vms: 1,
            },
            system,
            reps: 1,
            iops,
            p50_us: 10.0,
            p99_us: 20.0,
            p999_us: 30.0,
            backend_cpu_per_mio: if system.has_backend() { 2.0 } else { f64::NAN },
            backend_cores: 0.5,
            client_cpu_per_mio: 1.0,
            total_cpu_per_mio: 3.0,
            jain: f64::NAN,
        }
    }

    #[test]
    fn a_group_per_cell_and_a_bar_per_system() {
        let rows = [
            row(Medium::Tmpfs, System::Vublk, 180_000.0),
            row(Medium::Tmpfs, System::Qsd, 60_000.0),
            row(Medium::Tmpfs, System::IoUring, 400_000.0),
            row(Medium::Null, System::Vublk, 7_000.0),
            row(Medium::Null, System::Qsd, 9_000.0),
        ];
        let svg = chart(&rows, "a <title> & more", &["sub".into()]);
        assert!(svg.contains("a &lt;title&gt; &amp; more"));
        // Two panels × two cells; 5 bars per panel; io_uring's null bar is "n/a" twice.
        assert_eq!(svg.matches(r##"<g class="cell""##).count(), 4);
        assert_eq!(svg.matches(r##"<rect class="bar""##).count(), 10);
        assert_eq!(svg.matches(">n/a<").count(), 2);
        // The backend part of the CPU bars: vublk and QSD in two cells.
        assert_eq!(svg.matches(r##"<rect class="backend""##).count(), 4);
        assert!(svg.contains(r##"data-system="io_uring" data-value="400000""##));
        assert_eq!(svg.matches("<svg").count(), 1);
        assert!(svg.trim_end().ends_with("</svg>"));
    }

    #[test]
    fn the_axis_spans_the_values_with_room_for_labels() {
        let a = LogAxis::new([7_000.0, 1_800_000.0].into_iter(), 100.0, 250.0);
        assert_eq!(a.lo, 1_000.0);
        assert_eq!(a.hi, 10_000_000.0);
        // Not always a power of ten: 2M leaves too little room over 905k, 5M enough.
        let b = LogAxis::new([12_000.0, 905_000.0].into_iter(), 100.0, 250.0);
        assert_eq!((b.lo, b.hi), (10_000.0, 5_000_000.0));
        assert!(a.y(1_800_000.0) - 100.0 >= HEADROOM);
        assert!((a.y(1_000.0) - 350.0).abs() < 1e-9);
        assert_eq!(short(181_676.0), "182k");
        assert_eq!(short(1_839_086.0), "1.84M");
        assert_eq!(short(88.68), "88.7");
        assert_eq!(short(0.53), "0.53");
        assert_eq!(tick(1_000_000.0), "1M");
        assert_eq!(tick(10_000.0), "10k");
        assert_eq!(tick(100.0), "100");
        assert_eq!(tick(0.1), "0.1");
    }
}
