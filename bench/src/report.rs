//! From samples to the published figures: medians per cell and system, the Markdown tables with
//! the ratios of vublk to QSD, to io_uring and to fio, and the JSON document (every sample, the
//! medians, the ratios, the setup).
//!
//! Against QSD the CPU ratio compares the backends (both drive the same client the same way).
//! Against io_uring and fio, which have no backend, it compares the whole cost of an I/O: backend
//! plus load generator for vublk, the client alone for the reference.
//!
//! A cell with several VMs reports them together (their IOPS added up, their latencies merged,
//! CPU per I/O over all their I/O) and how evenly the backend served them: Jain's fairness index
//! over the per-VM IOPS, 1 when every VM got the same, 1/n when one got everything.
//!
//! Next to the ratio of the medians, each ratio is also taken round by round: the systems of a
//! round ran one right after the other, so on a medium whose speed drifts (the build machine's
//! disk is shared and its rounds differ by up to 4×) the ratio within a round is steadier than
//! the ratio of medians taken from different moments. The tables give the median of those
//! per-round ratios and in how many rounds vublk had more IOPS.

use serde_json::{json, Value};

use crate::load::LoadResult;
use crate::systems::System;
use crate::{median, Cell, Rate};

/// One measurement: one system, one cell, one repetition.
#[derive(Clone, Debug)]
pub struct Sample {
    pub cell: Cell,
    pub system: System,
    /// 0-based repetition.
    pub rep: usize,
    /// All the cell's VMs together.
    pub load: LoadResult,
    /// Each VM's IOPS (empty for fio, which reports its jobs as one).
    pub per_vm_iops: Vec<f64>,
    /// CPU seconds of the backend's processes in the measured window; `None` for io_uring,
    /// which has no backend.
    pub backend_cpu_s: Option<f64>,
    /// The share of the machine's CPU time the hypervisor stole in the measured window.
    pub host_steal: f64,
}

impl Sample {
    /// Backend CPU seconds per million I/Os; NaN without a backend.
    pub fn backend_cpu_per_mio(&self) -> f64 {
        per_mio(self.backend_cpu_s.unwrap_or(f64::NAN), self.load.ios)
    }

    pub fn client_cpu_per_mio(&self) -> f64 {
        per_mio(self.load.client_cpu_s, self.load.ios)
    }

    /// Backend and load generator together, CPU seconds per million I/Os.
    pub fn total_cpu_per_mio(&self) -> f64 {
        per_mio(
            self.backend_cpu_s.unwrap_or(0.0) + self.load.client_cpu_s,
            self.load.ios,
        )
    }

    /// How many cores the backend kept busy; NaN without a backend.
    pub fn backend_cores(&self) -> f64 {
        self.backend_cpu_s.unwrap_or(f64::NAN) / self.load.seconds
    }

    /// Jain's index over the VMs' IOPS; NaN with fewer than two.
    pub fn jain(&self) -> f64 {
        crate::jain(&self.per_vm_iops)
    }

    pub fn to_json(&self) -> Value {
        json!({
            "cell": cell_json(&self.cell),
            "system": self.system.name(),
            "rep": self.rep,
            "load": self.load.to_json(),
            "per_vm_iops": self.per_vm_iops,
            "jain": self.jain(),
            "backend_cpu_s": self.backend_cpu_s,
            "backend_cpu_s_per_mio": self.backend_cpu_per_mio(),
            "total_cpu_s_per_mio": self.total_cpu_per_mio(),
            "host_steal": self.host_steal,
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
        "rate": c.rate.iops(),
        "vms": c.vms,
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
    /// Backend plus load generator.
    pub total_cpu_per_mio: f64,
    /// Jain's index over the VMs' IOPS (NaN with one VM, and for fio).
    pub jain: f64,
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
            "total_cpu_s_per_mio": self.total_cpu_per_mio,
            "jain": self.jain,
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
            // NaN (shown as "–") when no repetition has the figure, e.g. io_uring's backend CPU.
            let m = |f: fn(&Sample) -> f64| {
                let values: Vec<f64> = mine.iter().map(|s| f(s)).collect();
                if values.iter().any(|x| x.is_finite()) {
                    median(&values)
                } else {
                    f64::NAN
                }
            };
            rows.push(Row {
                cell,
                system: *system,
                reps: mine.len(),
                iops: m(|s| s.load.iops),
                p50_us: m(|s| s.load.p50_us),
                p99_us: m(|s| s.load.p99_us),
                p999_us: m(|s| s.load.p999_us),
                backend_cpu_per_mio: m(|s| s.backend_cpu_per_mio()),
                backend_cores: m(|s| s.backend_cores()),
                client_cpu_per_mio: m(|s| s.client_cpu_per_mio()),
                total_cpu_per_mio: m(|s| s.total_cpu_per_mio()),
                jain: m(|s| s.jain()),
            });
        }
    }
    rows
}

/// `system`'s row in `cell`.
fn find<'a>(rows: &'a [Row], cell: &Cell, system: System) -> Option<&'a Row> {
    rows.iter().find(|r| r.cell == *cell && r.system == system)
}

/// vublk (or vublk-single) against a reference system in one cell.
#[derive(Clone, Debug)]
pub struct Ratio {
    pub cell: Cell,
    pub system: System,
    /// The reference: QSD or io_uring.
    pub versus: System,
    /// IOPS ratio (higher is better for vublk).
    pub iops: f64,
    /// p50 latency ratio (lower is better).
    pub p50: f64,
    /// CPU per I/O ratio (lower is better): backend against backend for QSD, backend plus load
    /// generator against the load generator for io_uring ([`cpu_basis`]).
    pub cpu_per_io: f64,
    /// The same two ratios taken within each round, then their median (NaN without a round in
    /// which both ran).
    pub iops_by_round: f64,
    pub cpu_per_io_by_round: f64,
    /// Rounds in which both ran, and in how many of them vublk had more IOPS.
    pub rounds: usize,
    pub rounds_ahead: usize,
}

/// What the CPU ratio against `versus` compares.
pub fn cpu_basis(versus: System) -> &'static str {
    if versus.has_backend() {
        "backend"
    } else {
        "backend+client"
    }
}

impl Ratio {
    pub fn to_json(&self) -> Value {
        json!({
            "cell": cell_json(&self.cell),
            "system": self.system.name(),
            "versus": self.versus.name(),
            "iops": self.iops,
            "p50": self.p50,
            "cpu_per_io": self.cpu_per_io,
            "cpu_basis": cpu_basis(self.versus),
            "by_round": {
                "iops": self.iops_by_round,
                "cpu_per_io": self.cpu_per_io_by_round,
                "rounds": self.rounds,
                "rounds_ahead": self.rounds_ahead,
            },
        })
    }
}

/// Every vublk row that has a `versus` row in the same cell, against it; `samples` are the
/// rounds the rows summarize.
pub fn ratios(rows: &[Row], samples: &[Sample], versus: System) -> Vec<Ratio> {
    // CPU per million I/Os on the basis of the comparison.
    let cpu = |backend: f64, total: f64| if versus.has_backend() { backend } else { total };
    rows.iter()
        .filter(|r| match versus {
            // Against vublk itself: its twin with limits no load reaches (the limiter's cost).
            System::Vublk => r.system == System::VublkQos,
            _ => r.system.is_vublk(),
        })
        .filter_map(|r| {
            let q = find(rows, &r.cell, versus)?;
            let pairs: Vec<(&Sample, &Sample)> = samples
                .iter()
                .filter(|a| a.cell == r.cell && a.system == r.system)
                .filter_map(|a| {
                    let b = samples
                        .iter()
                        .find(|b| b.cell == r.cell && b.system == versus && b.rep == a.rep)?;
                    Some((a, b))
                })
                .collect();
            let by_round = |f: &dyn Fn(&Sample, &Sample) -> f64| {
                if pairs.is_empty() {
                    f64::NAN
                } else {
                    median(&pairs.iter().map(|(a, b)| f(a, b)).collect::<Vec<_>>())
                }
            };
            Some(Ratio {
                cell: r.cell,
                system: r.system,
                versus,
                iops: r.iops / q.iops,
                p50: r.p50_us / q.p50_us,
                cpu_per_io: cpu(r.backend_cpu_per_mio, r.total_cpu_per_mio)
                    / cpu(q.backend_cpu_per_mio, q.total_cpu_per_mio),
                iops_by_round: by_round(&|a, b| a.load.iops / b.load.iops),
                cpu_per_io_by_round: by_round(&|a, b| {
                    cpu(a.backend_cpu_per_mio(), a.total_cpu_per_mio())
                        / cpu(b.backend_cpu_per_mio(), b.total_cpu_per_mio())
                }),
                rounds: pairs.len(),
                rounds_ahead: pairs
                    .iter()
                    .filter(|(a, b)| a.load.iops > b.load.iops)
                    .count(),
            })
        })
        .collect()
}

/// The references vublk is compared with, in the order of their tables (vublk itself for
/// `vublk-qos`).
pub const REFERENCES: [System; 5] = [
    System::Qsd,
    System::IoUring,
    System::Fio,
    System::RbdBench,
    System::Vublk,
];

/// A paced row whose IOPS fell short of its rate by more than this fraction did not keep up.
const SHORTFALL: f64 = 0.03;

/// The paced rows that did not reach their rate.
pub fn fell_short(rows: &[Row]) -> Vec<&Row> {
    rows.iter()
        .filter(|r| {
            r.cell
                .rate
                .iops()
                .is_some_and(|rate| r.iops < f64::from(rate) * (1.0 - SHORTFALL))
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

/// A ratio: `1.23×`, or `–` when there is none (rbd-bench reports no latencies).
fn times(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.2}×")
    } else {
        "–".to_string()
    }
}

/// Which optional columns a table has: the rate when some cell is paced, the VMs (and Jain's
/// index) when some cell has several. Tables without such cells keep the columns they had.
#[derive(Clone, Copy)]
struct Columns {
    paced: bool,
    many: bool,
}

impl Columns {
    fn of(rows: &[Row]) -> Columns {
        Columns {
            paced: rows.iter().any(|r| r.cell.rate != Rate::Max),
            many: rows.iter().any(|r| r.cell.vms > 1),
        }
    }

    /// The cell's columns of a table row, ending with "| ".
    fn cell(self, c: &Cell) -> String {
        let mut s = format!(
            "| {} | {} | {} | {} | {} | ",
            c.medium, c.rw, c.iodepth, c.queues, c.client
        );
        if self.many {
            s.push_str(&format!("{} | ", c.vms));
        }
        if self.paced {
            s.push_str(&format!("{} | ", c.rate));
        }
        s
    }

    /// The cell's header columns and their alignment row, matching [`Columns::cell`].
    fn header(self) -> (String, String) {
        let mut head = "| medium | rw | iodepth | queues | client | ".to_string();
        let mut align = "|---|---|---:|---:|---|".to_string();
        if self.many {
            head.push_str("VMs | ");
            align.push_str("---:|");
        }
        if self.paced {
            head.push_str("rate IOPS | ");
            align.push_str("---:|");
        }
        (head, align)
    }
}

/// The results table (one row per cell and system), a ratio table per reference that ran, and
/// notes (paced runs that fell short of their rate, `notes` from the caller).
pub fn markdown(rows: &[Row], samples: &[Sample], notes: &[String]) -> String {
    let mut out = String::new();
    let cols = Columns::of(rows);
    let (head, align) = cols.header();
    out.push_str(&head);
    out.push_str(
        "system | IOPS | p50 µs | p99 µs | p99.9 µs \
         | backend CPU s / M I/O | backend cores | client CPU s / M I/O |",
    );
    if cols.many {
        out.push_str(" Jain |");
    }
    out.push('\n');
    out.push_str(&align);
    out.push_str("---|---:|---:|---:|---:|---:|---:|---:|");
    if cols.many {
        out.push_str("---:|");
    }
    out.push('\n');
    for r in rows {
        out.push_str(&cols.cell(&r.cell));
        out.push_str(&format!(
            "{} | {} | {} | {} | {} | {} | {} | {} |",
            r.system,
            num(r.iops, 0),
            num(r.p50_us, 1),
            num(r.p99_us, 1),
            num(r.p999_us, 1),
            num(r.backend_cpu_per_mio, 2),
            num(r.backend_cores, 2),
            num(r.client_cpu_per_mio, 2),
        ));
        if cols.many {
            out.push_str(&format!(" {} |", num(r.jain, 3)));
        }
        out.push('\n');
    }
    for versus in REFERENCES {
        let ratios = ratios(rows, samples, versus);
        if ratios.is_empty() {
            continue;
        }
        let (name, cpu) = match versus {
            System::Qsd => ("QSD", "CPU per I/O ÷ QSD"),
            System::Fio => ("fio", "total CPU per I/O ÷ fio"),
            System::Vublk => ("vublk", "CPU per I/O ÷ vublk"),
            System::RbdBench => ("rbd-bench", "total CPU per I/O ÷ rbd-bench"),
            _ => ("io_uring", "total CPU per I/O ÷ io_uring"),
        };
        out.push('\n');
        out.push_str(&head);
        out.push_str(&format!(
            "system | IOPS ÷ {name} | p50 ÷ {name} | {cpu} \
             | by round: IOPS ÷ | by round: CPU ÷ | rounds with more IOPS |\n"
        ));
        out.push_str(&align);
        out.push_str("---|---:|---:|---:|---:|---:|---:|\n");
        for r in &ratios {
            out.push_str(&cols.cell(&r.cell));
            out.push_str(&format!(
                "{} | {} | {} | {} | {} | {} | {} of {} |\n",
                r.system,
                times(r.iops),
                times(r.p50),
                times(r.cpu_per_io),
                times(r.iops_by_round),
                times(r.cpu_per_io_by_round),
                r.rounds_ahead,
                r.rounds,
            ));
        }
    }
    let notes = all_notes(rows, notes);
    if !notes.is_empty() {
        out.push('\n');
        for n in &notes {
            out.push_str(&format!("- {n}\n"));
        }
    }
    out
}

/// `extra` and what the rows call for: paced runs that fell short of their rate, what io_uring's
/// CPU figures mean.
fn all_notes(rows: &[Row], extra: &[String]) -> Vec<String> {
    let mut notes = extra.to_vec();
    for r in fell_short(rows) {
        notes.push(format!(
            "{} did not keep up in {}: {} IOPS of the {} asked for",
            r.system,
            r.cell,
            num(r.iops, 0),
            r.cell.rate
        ));
    }
    for reference in [System::IoUring, System::Fio, System::RbdBench] {
        if rows.iter().any(|r| r.system == reference) {
            let client = match reference {
                System::IoUring => "the load generator's",
                System::Fio => "fio's",
                _ => "the rbd process's, librbd's threads included",
            };
            notes.push(format!(
                "{reference} has no backend: its CPU per I/O is the client column ({client}), \
                 and the {reference} ratios compare backend + client CPU with it"
            ));
        }
    }
    notes
}

/// The JSON document: `setup` (machine, versions, command, options), every sample, the medians,
/// the ratios and the notes (as in the Markdown). Non-finite numbers (a CPU per I/O with no I/O,
/// io_uring's backend CPU) become null.
pub fn json(setup: Value, samples: &[Sample], rows: &[Row], notes: &[String]) -> Value {
    json!({
        "notes": all_notes(rows, notes),
        "setup": setup,
        "samples": samples.iter().map(Sample::to_json).collect::<Vec<_>>(),
        "medians": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        "ratios": REFERENCES
            .iter()
            .flat_map(|v| ratios(rows, samples, *v))
            .map(|r| r.to_json())
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::Medium;
    use crate::{ClientMode, Rw};

    fn cell(rate: Rate) -> Cell {
        Cell {
            medium: Medium::Null,
            rw: Rw::RandRead,
            iodepth: 32,
            queues: 1,
            client: ClientMode::Interrupt,
            rate,
            vms: 1,
        }
    }

    fn sample(system: System, rep: usize, iops: f64, cpu: f64) -> Sample {
        Sample {
            cell: cell(Rate::Max),
            system,
            rep,
            load: LoadResult {
                ios: (iops * 2.0) as u64,
                seconds: 2.0,
                iops,
                p50_us: 1e6 / iops,
                client_cpu_s: 1.0,
                ..Default::default()
            },
            per_vm_iops: vec![iops],
            backend_cpu_s: system.has_backend().then_some(cpu),
            host_steal: 0.0,
        }
    }

    #[test]
    fn medians_and_ratios() {
        let samples = vec![
            sample(System::Vublk, 0, 300.0, 1.0),
            sample(System::Qsd, 0, 100.0, 1.0),
            sample(System::Vublk, 1, 200.0, 1.0),
            sample(System::Qsd, 1, 250.0, 1.0),
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
        let r = ratios(&rows, &samples, System::Qsd);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].iops, 3.0);
        // 1 CPU second per 600 I/Os against 1 per 200: a third of QSD's cost.
        assert!((r[0].cpu_per_io - 1.0 / 3.0).abs() < 1e-9);
        // Round by round: 300/100, 200/250, 900/80 → median 3.0; vublk ahead in 2 of 3. CPU per
        // I/O is the inverse of IOPS here (1 CPU second per round each).
        assert_eq!(
            (r[0].iops_by_round, r[0].rounds, r[0].rounds_ahead),
            (3.0, 3, 2)
        );
        assert!((r[0].cpu_per_io_by_round - 1.0 / 3.0).abs() < 1e-9, "{r:?}");
        assert!(ratios(&rows, &samples, System::IoUring).is_empty());
        let md = markdown(&rows, &samples, &[]);
        assert!(
            md.contains("| null | randread | 32 | 1 | interrupt | vublk | 300 |"),
            "{md}"
        );
        assert!(
            md.contains("| vublk | 3.00× | 0.33× | 0.33× | 3.00× | 0.33× | 2 of 3 |"),
            "{md}"
        );
        assert!(
            !md.contains("rate IOPS") && !md.contains("io_uring"),
            "{md}"
        );
        let doc = json(json!({}), &samples, &rows, &[]);
        assert_eq!(doc["samples"].as_array().unwrap().len(), 6);
        assert_eq!(doc["ratios"][0]["iops"], 3.0);
        assert_eq!(doc["ratios"][0]["versus"], "qsd");
        assert_eq!(doc["ratios"][0]["by_round"]["rounds_ahead"], 2);
    }

    #[test]
    fn rounds_pair_by_repetition_and_a_missing_partner_is_skipped() {
        // The medians favour vublk (400 against 300) though it lost the one round both ran.
        let samples = vec![
            sample(System::Vublk, 0, 200.0, 1.0),
            sample(System::Qsd, 0, 300.0, 1.0),
            sample(System::Vublk, 1, 600.0, 1.0),
        ];
        let rows = summarize(&samples);
        let r = ratios(&rows, &samples, System::Qsd);
        assert!((r[0].iops - 400.0 / 300.0).abs() < 1e-9, "{r:?}");
        assert!((r[0].iops_by_round - 200.0 / 300.0).abs() < 1e-9, "{r:?}");
        assert_eq!((r[0].rounds, r[0].rounds_ahead), (1, 0));
    }

    #[test]
    fn io_uring_has_no_backend_cpu_and_its_ratios_count_the_client() {
        let samples = vec![
            sample(System::Vublk, 0, 300.0, 2.0),
            sample(System::IoUring, 0, 600.0, 0.0),
        ];
        let rows = summarize(&samples);
        assert!(rows[1].backend_cpu_per_mio.is_nan() && rows[1].backend_cores.is_nan());
        let r = ratios(&rows, &samples, System::IoUring);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].iops, 0.5);
        // vublk: 3 CPU s (backend 2 + client 1) per 600 I/Os; io_uring: 1 per 1200.
        assert!((r[0].cpu_per_io - 6.0).abs() < 1e-9, "{r:?}");
        let md = markdown(&rows, &samples, &["a note".into()]);
        assert!(
            md.contains("| io_uring | 600 | 1666.7 | 0.0 | 0.0 | – | – | 833.33 |"),
            "{md}"
        );
        assert!(
            md.contains("| vublk | 0.50× | 2.00× | 6.00× | 0.50× | 6.00× | 0 of 1 |"),
            "{md}"
        );
        assert!(md.contains("\n- a note\n"), "{md}");
        let doc = json(json!({}), &samples, &rows, &[]);
        assert!(doc["samples"][1]["backend_cpu_s"].is_null());
        assert!(doc["medians"][1]["backend_cpu_s_per_mio"].is_null());
        assert_eq!(doc["ratios"][0]["versus"], "io_uring");
        assert_eq!(doc["ratios"][0]["cpu_basis"], "backend+client");
    }

    #[test]
    fn many_vm_cells_get_a_vms_column_and_jain_index() {
        let mut samples = vec![
            sample(System::Vublk, 0, 800.0, 1.0),
            sample(System::Qsd, 0, 400.0, 1.0),
            sample(System::Fio, 0, 1000.0, 0.0),
        ];
        for s in &mut samples {
            s.cell.vms = 4;
        }
        samples[0].per_vm_iops = vec![200.0; 4];
        // One VM got half of it: 400² / (4 × (200² + 100² + 50² + 50²)) = 0.727.
        samples[1].per_vm_iops = vec![200.0, 100.0, 50.0, 50.0];
        samples[2].per_vm_iops = vec![];
        let rows = summarize(&samples);
        assert_eq!(rows[0].jain, 1.0);
        assert!((rows[1].jain - 400.0 * 400.0 / (4.0 * 55_000.0)).abs() < 1e-9);
        assert!(rows[2].jain.is_nan());
        let md = markdown(&rows, &samples, &[]);
        assert!(
            md.starts_with("| medium | rw | iodepth | queues | client | VMs | system |"),
            "{md}"
        );
        assert!(md.contains("| interrupt | 4 | vublk | 800 |"), "{md}");
        assert!(md.contains(" | 1.000 |\n"), "{md}");
        assert!(md.contains(" | 0.727 |\n"), "{md}");
        // fio is a reference like io_uring: vublk's total CPU per I/O against fio's client.
        assert!(md.contains("| IOPS ÷ fio |"), "{md}");
        assert!(
            md.contains("| 4 | vublk | 0.80× |"),
            "vublk has 0.8 of the disk's limit: {md}"
        );
        assert!(md.contains("- fio has no backend"), "{md}");
        let doc = json(json!({}), &samples, &rows, &[]);
        assert_eq!(doc["samples"][1]["per_vm_iops"][3], 50.0);
        assert_eq!(doc["medians"][0]["jain"], 1.0);
        assert!(doc["medians"][2]["jain"].is_null());
        assert_eq!(doc["medians"][0]["cell"]["vms"], 4);
        assert!(doc["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["versus"] == "fio" && r["cpu_basis"] == "backend+client"));
    }

    #[test]
    fn paced_cells_get_a_rate_column_and_shortfalls_a_note() {
        let mut samples = vec![
            sample(System::Vublk, 0, 1000.0, 1.0),
            sample(System::Qsd, 0, 900.0, 1.0),
        ];
        for s in &mut samples {
            s.cell = cell(Rate::Iops(1000));
        }
        let rows = summarize(&samples);
        assert_eq!(fell_short(&rows).len(), 1);
        let md = markdown(&rows, &samples, &[]);
        assert!(md.starts_with("| medium | rw | iodepth | queues | client | rate IOPS | system |"));
        assert!(md.contains("| interrupt | 1000 | vublk | 1000 |"), "{md}");
        assert!(
            md.contains("- qsd did not keep up in null randread iodepth 32 queues 1 interrupt at 1000 IOPS: 900 IOPS of the 1000 asked for"),
            "{md}"
        );
    }
}
