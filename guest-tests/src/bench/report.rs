//! From samples to the published figures: medians per cell and system, the Markdown tables with
//! the vublk/QSD ratios, and the JSON document (every sample, the medians, the setup).

use serde_json::{json, Value};

use super::load::LoadResult;
use super::systems::System;
use super::{median, Cell};

/// One measurement: one system, one cell, one repetition.
#[derive(Clone, Debug)]
pub struct Sample {
    pub cell: Cell,
    pub system: System,
    /// 0-based repetition.
    pub rep: usize,
    pub load: LoadResult,
    /// CPU seconds of the backend's processes in the measured window.
    pub backend_cpu_s: f64,
}

impl Sample {
    /// Backend CPU seconds per million I/Os.
    pub fn backend_cpu_per_mio(&self) -> f64 {
        per_mio(self.backend_cpu_s, self.load.ios)
    }

    pub fn client_cpu_per_mio(&self) -> f64 {
        per_mio(self.load.client_cpu_s, self.load.ios)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cell": cell_json(&self.cell),
            "system": self.system.name(),
            "rep": self.rep,
            "load": self.load.to_json(),
            "backend_cpu_s": self.backend_cpu_s,
            "backend_cpu_s_per_mio": self.backend_cpu_per_mio(),
        })
    }
}

fn per_mio(cpu_s: f64, ios: u64) -> f64 {
    if ios == 0 {
        f64::NAN
    } else {
        cpu_s * 1e6 / ios as f64
    }
}

fn cell_json(c: &Cell) -> Value {
    json!({
        "medium": c.medium.name(),
        "rw": c.rw.name(),
        "iodepth": c.iodepth,
        "queues": c.queues,
        "client": c.client.name(),
    })
}

/// The medians of one system's repetitions in one cell.
#[derive(Clone, Debug)]
pub struct Row {
    pub cell: Cell,
    pub system: System,
    pub reps: usize,
    pub iops: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub backend_cpu_per_mio: f64,
    /// Backend CPU seconds per second: how many cores it kept busy.
    pub backend_cores: f64,
    pub client_cpu_per_mio: f64,
}

impl Row {
    pub fn to_json(&self) -> Value {
        json!({
            "cell": cell_json(&self.cell),
            "system": self.system.name(),
            "reps": self.reps,
            "iops": self.iops,
            "p50_us": self.p50_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "backend_cpu_s_per_mio": self.backend_cpu_per_mio,
            "backend_cores": self.backend_cores,
            "client_cpu_s_per_mio": self.client_cpu_per_mio,
        })
    }
}

/// Medians per (cell, system), in the order cells and systems first appear in `samples`.
pub fn summarize(samples: &[Sample]) -> Vec<Row> {
    let mut keys: Vec<(Cell, System)> = Vec::new();
    for s in samples {
        if !keys.contains(&(s.cell, s.system)) {
            keys.push((s.cell, s.system));
        }
    }
    // Group by cell first (cells in order of appearance), systems in order of appearance.
    let mut cells: Vec<Cell> = Vec::new();
    for (c, _) in &keys {
        if !cells.contains(c) {
            cells.push(*c);
        }
    }
    let mut rows = Vec::new();
    for cell in cells {
        for (_, system) in keys.iter().filter(|(c, _)| *c == cell) {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.cell == cell && s.system == *system)
                .collect();
            let m = |f: fn(&Sample) -> f64| median(&mine.iter().map(|s| f(s)).collect::<Vec<_>>());
            rows.push(Row {
                cell,
                system: *system,
                reps: mine.len(),
                iops: m(|s| s.load.iops),
                p50_us: m(|s| s.load.p50_us),
                p99_us: m(|s| s.load.p99_us),
                p999_us: m(|s| s.load.p999_us),
                backend_cpu_per_mio: m(|s| s.backend_cpu_per_mio()),
                backend_cores: m(|s| s.backend_cpu_s / s.load.seconds),
                client_cpu_per_mio: m(|s| s.client_cpu_per_mio()),
            });
        }
    }
    rows
}

/// `system`'s row in `cell`.
fn find<'a>(rows: &'a [Row], cell: &Cell, system: System) -> Option<&'a Row> {
    rows.iter().find(|r| r.cell == *cell && r.system == system)
}

/// vublk (or vublk-single) against QSD in one cell.
#[derive(Clone, Debug)]
pub struct Ratio {
    pub cell: Cell,
    pub system: System,
    /// IOPS ratio (higher is better for vublk).
    pub iops: f64,
    /// p50 latency ratio (lower is better).
    pub p50: f64,
    /// Backend CPU per I/O ratio (lower is better).
    pub cpu_per_io: f64,
}

impl Ratio {
    pub fn to_json(&self) -> Value {
        json!({
            "cell": cell_json(&self.cell),
            "system": self.system.name(),
            "versus": "qsd",
            "iops": self.iops,
            "p50": self.p50,
            "cpu_per_io": self.cpu_per_io,
        })
    }
}

/// Every vublk row that has a QSD row in the same cell.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    rows.iter()
        .filter(|r| r.system.is_vublk())
        .filter_map(|r| {
            let q = find(rows, &r.cell, System::Qsd)?;
            Some(Ratio {
                cell: r.cell,
                system: r.system,
                iops: r.iops / q.iops,
                p50: r.p50_us / q.p50_us,
                cpu_per_io: r.backend_cpu_per_mio / q.backend_cpu_per_mio,
            })
        })
        .collect()
}

fn num(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "–".to_string()
    }
}

/// The results table (one row per cell and system) and the ratio table.
pub fn markdown(rows: &[Row]) -> String {
    let mut out = String::new();
    out.push_str(
        "| medium | rw | iodepth | queues | client | system | IOPS | p50 µs | p99 µs | p99.9 µs \
         | backend CPU s / M I/O | backend cores | client CPU s / M I/O |\n",
    );
    out.push_str("|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let c = &r.cell;
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            c.medium,
            c.rw,
            c.iodepth,
            c.queues,
            c.client,
            r.system,
            num(r.iops, 0),
            num(r.p50_us, 1),
            num(r.p99_us, 1),
            num(r.p999_us, 1),
            num(r.backend_cpu_per_mio, 2),
            num(r.backend_cores, 2),
            num(r.client_cpu_per_mio, 2),
        ));
    }
    let ratios = ratios(rows);
    if !ratios.is_empty() {
        out.push('\n');
        out.push_str(
            "| medium | rw | iodepth | queues | client | system | IOPS ÷ QSD | p50 ÷ QSD \
             | CPU per I/O ÷ QSD |\n",
        );
        out.push_str("|---|---|---:|---:|---|---|---:|---:|---:|\n");
        for r in &ratios {
            let c = &r.cell;
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {}× | {}× | {}× |\n",
                c.medium,
                c.rw,
                c.iodepth,
                c.queues,
                c.client,
                r.system,
                num(r.iops, 2),
                num(r.p50, 2),
                num(r.cpu_per_io, 2),
            ));
        }
    }
    out
}

/// The JSON document: `setup` (machine, versions, command, options), every sample, the medians
/// and the ratios. Non-finite numbers (a CPU per I/O with no I/O) become null.
pub fn json(setup: Value, samples: &[Sample], rows: &[Row]) -> Value {
    json!({
        "setup": setup,
        "samples": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        "medians": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "ratios": ratios(rows).iter().map(Ratio::to_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::media::Medium;
    use crate::bench::{ClientMode, Rw};

    fn sample(system: System, rep: usize, iops: f64, cpu: f64) -> Sample {
        Sample {
            cell: Cell {
                medium: Medium::Null,
                rw: Rw::RandRead,
                iodepth: 32,
                queues: 1,
                client: ClientMode::Interrupt,
            },
            system,
            rep,
            load: LoadResult {
                ios: (iops * 2.0) as u64,
                seconds: 2.0,
                iops,
                p50_us: 1e6 / iops,
                ..Default::default()
            },
            backend_cpu_s: cpu,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let samples = vec![
            sample(System::Vublk, 0, 300.0, 1.0),
            sample(System::Qsd, 0, 100.0, 1.0),
            sample(System::Vublk, 1, 200.0, 1.0),
            sample(System::Qsd, 1, 120.0, 1.0),
            sample(System::Vublk, 2, 900.0, 1.0),
            sample(System::Qsd, 2, 80.0, 1.0),
        ];
        let rows = summarize(&samples);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].system, rows[0].iops, rows[0].reps),
            (System::Vublk, 300.0, 3)
        );
        assert_eq!((rows[1].system, rows[1].iops), (System::Qsd, 100.0));
        let r = ratios(&rows);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].iops, 3.0);
        // 1 CPU second per 600 I/Os against 1 per 200: a third of QSD's cost.
        assert!((r[0].cpu_per_io - 1.0 / 3.0).abs() < 1e-9);
        let md = markdown(&rows);
        assert!(
            md.contains("| null | randread | 32 | 1 | interrupt | vublk | 300 |"),
            "{md}"
        );
        assert!(md.contains("| 3.00× |"), "{md}");
        let doc = json(json!({}), &samples, &rows);
        assert_eq!(doc["samples"].as_array().unwrap().len(), 6);
        assert_eq!(doc["ratios"][0]["iops"], 3.0);
    }
}
