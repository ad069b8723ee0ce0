//! vublk-bench in smoke mode, so the benchmark does not rot: it must run every system (vublk, QSD,
//! and io_uring and fio where they apply), with one VM and with several, print a well-formed
//! Markdown table, write a well-formed JSON document with non-zero IOPS for every system in every
//! cell, and draw a well-formed SVG chart with a group of bars per cell. No speed is asserted:
//! benchmarks are not tests. (A paced run is checked not to exceed its rate, which holds however
//! slow the machine is.)

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// What one smoke run wrote.
struct Output {
    stdout: String,
    md: String,
    doc: Value,
    svg: String,
}

/// Runs `vublk-bench --smoke ARGS` writing its JSON, Markdown and SVG into `dir`.
fn smoke(dir: &Path, name: &str, args: &[&str]) -> Output {
    let json = dir.join(format!("{name}.json"));
    let md = dir.join(format!("{name}.md"));
    let svg = dir.join(format!("{name}.svg"));
    let out = Command::new(env!("CARGO_BIN_EXE_vublk-bench"))
        .arg("--smoke")
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .arg("--svg")
        .arg(&svg)
        .output()
        .expect("run vublk-bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vublk-bench {args:?} failed ({}):\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("UTF-8 table");
    let md = std::fs::read_to_string(&md).expect("Markdown file written");
    let doc = serde_json::from_str(&std::fs::read_to_string(&json).expect("JSON file written"))
        .expect("the JSON file parses");
    let svg = std::fs::read_to_string(&svg).expect("SVG file written");
    Output {
        stdout,
        md,
        doc,
        svg,
    }
}

/// The rows of the Markdown table that starts with a header holding `first_header`, each split
/// into cells; checks every row has as many cells as the header.
fn table(md: &str, first_header: &str) -> Vec<Vec<String>> {
    let lines: Vec<&str> = md.lines().collect();
    let start = lines
        .iter()
        .position(|l| l.contains(first_header))
        .unwrap_or_else(|| panic!("no table with {first_header:?} in:\n{md}"));
    let cells = |l: &str| -> Vec<String> {
        assert!(
            l.starts_with('|') && l.ends_with('|'),
            "not a table row: {l:?}"
        );
        l[1..l.len() - 1]
            .split('|')
            .map(|c| c.trim().to_string())
            .collect()
    };
    let header = cells(lines[start]);
    let sep = cells(lines[start + 1]);
    assert_eq!(
        sep.len(),
        header.len(),
        "separator row: {}",
        lines[start + 1]
    );
    assert!(sep
        .iter()
        .all(|c| c.trim_matches(':').chars().all(|ch| ch == '-') && c.contains("---")));
    let rows: Vec<Vec<String>> = lines[start + 2..]
        .iter()
        .take_while(|l| l.starts_with('|'))
        .map(|l| cells(l))
        .collect();
    for r in &rows {
        assert_eq!(r.len(), header.len(), "row {r:?} against header {header:?}");
    }
    rows
}

/// The column called `name` in the table whose header is `header`.
fn col(header: &str, name: &str) -> usize {
    header
        .trim_matches('|')
        .split('|')
        .position(|c| c.trim() == name)
        .unwrap_or_else(|| panic!("no column {name:?} in {header}"))
}

/// The systems expected on `medium` (interrupt-driven clients): io_uring has no null medium, fio
/// runs on the disk only.
fn systems_on(medium: &str, systems: &[&'static str]) -> Vec<&'static str> {
    systems
        .iter()
        .copied()
        .filter(|s| !(*s == "io_uring" && medium == "null"))
        .filter(|s| !(*s == "fio" && medium != "disk"))
        .collect()
}

/// Checks the table, the JSON and the chart of one smoke run over `media` with `systems`, one
/// cell per medium, each with `vms` VMs.
fn check(out: &Output, media: &[&str], systems: &[&'static str], vms: u16) {
    let Output {
        stdout,
        md,
        doc,
        svg,
    } = out;
    assert_eq!(stdout, md, "the printed table and the Markdown file differ");
    let runs: usize = media.iter().map(|m| systems_on(m, systems).len()).sum();

    // The results table: one row per medium and system, with IOPS > 0 and ordered percentiles.
    let header = md.lines().next().expect("a header line");
    let rows = table(md, "| medium | rw | iodepth");
    let (system, iops, p50, p99, backend, cores, client) = (
        col(header, "system"),
        col(header, "IOPS"),
        col(header, "p50 µs"),
        col(header, "p99 µs"),
        col(header, "backend CPU s / M I/O"),
        col(header, "backend cores"),
        col(header, "client CPU s / M I/O"),
    );
    assert_eq!(rows.len(), runs, "rows: {rows:?}");
    for m in media {
        for s in systems_on(m, systems) {
            let row = rows
                .iter()
                .find(|r| r[0] == *m && r[system] == s)
                .unwrap_or_else(|| panic!("no {s} row for {m}:\n{md}"));
            let n = |i: usize| row[i].parse::<f64>().unwrap_or_else(|_| panic!("{row:?}"));
            assert!(n(iops) > 0.0, "{s} on {m} did no I/O: {row:?}");
            assert!(n(p50) > 0.0 && n(p50) <= n(p99), "{row:?}");
            assert!(n(client) >= 0.0, "{row:?}");
            if s == "io_uring" || s == "fio" {
                // No backend: its CPU is the client column's.
                assert_eq!(
                    (row[backend].as_str(), row[cores].as_str()),
                    ("–", "–"),
                    "{row:?}"
                );
            } else {
                assert!(n(backend) >= 0.0 && n(cores) >= 0.0, "{row:?}");
            }
        }
    }
    // The ratio tables: a row per cell where the reference ran, a finite positive ratio.
    let vublk_cells = |reference: &str| {
        media
            .iter()
            .filter(|m| {
                let on = systems_on(m, systems);
                on.contains(&"vublk") && on.contains(&reference)
            })
            .count()
    };
    for (heading, reference) in [
        ("IOPS ÷ QSD", "qsd"),
        ("IOPS ÷ io_uring", "io_uring"),
        ("IOPS ÷ fio", "fio"),
    ] {
        let expected = vublk_cells(reference);
        if expected == 0 {
            assert!(!md.contains(heading), "{md}");
            continue;
        }
        let ratios = table(md, heading);
        assert_eq!(ratios.len(), expected, "{heading}:\n{md}");
        for r in &ratios {
            // IOPS, p50 and CPU against the reference, then IOPS and CPU round by round.
            for column in 1..=5 {
                let x: f64 = r[system + column]
                    .trim_end_matches('×')
                    .parse()
                    .unwrap_or_else(|_| panic!("column {column} is not a ratio: {r:?}"));
                assert!(x.is_finite() && x > 0.0, "{r:?}");
            }
            // The smoke runs one round.
            assert!(
                matches!(r[system + 6].as_str(), "0 of 1" | "1 of 1"),
                "rounds with more IOPS: {r:?}"
            );
        }
    }
    if systems.contains(&"io_uring") && media.contains(&"null") {
        assert!(
            md.contains("- io_uring does not run on the null and rbd media"),
            "no note on io_uring and null:\n{md}"
        );
    }

    // The JSON: the setup, one sample per run, medians and ratios that agree with the table.
    assert_eq!(
        doc["setup"]["machine"]["cpus"].as_u64().map(|n| n > 0),
        Some(true)
    );
    for s in systems {
        assert!(
            doc["setup"]["versions"][s]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "no version for {s}"
        );
    }
    let samples = doc["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), runs);
    for s in samples {
        assert!(s["load"]["ios"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["cell"]["vms"], vms, "{s}");
        let steal = s["host_steal"].as_f64().expect("host_steal");
        assert!((0.0..1.0).contains(&steal), "{s}");
        if s["system"] == "io_uring" || s["system"] == "fio" {
            assert!(s["backend_cpu_s"].is_null(), "{s}");
        } else {
            assert!(s["backend_cpu_s"].as_f64().unwrap() >= 0.0, "{s}");
        }
        // A load generator per VM, each with its own IOPS, adding up to the cell's (fio reports
        // its jobs as one).
        let per_vm: Vec<f64> = s["per_vm_iops"]
            .as_array()
            .expect("per_vm_iops")
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        if s["system"] == "fio" {
            assert!(per_vm.is_empty(), "{s}");
        } else {
            assert_eq!(per_vm.len(), usize::from(vms), "{s}");
            assert!(per_vm.iter().all(|x| *x > 0.0), "a VM did no I/O: {s}");
            let total = s["load"]["iops"].as_f64().unwrap();
            assert!(
                (per_vm.iter().sum::<f64>() - total).abs() <= 1e-6 * total,
                "{s}"
            );
        }
        if vms > 1 && s["system"] != "fio" {
            let jain = s["jain"].as_f64().expect("Jain's index");
            assert!(
                jain > 1.0 / f64::from(vms) - 1e-9 && jain <= 1.0 + 1e-9,
                "{s}"
            );
        } else {
            assert!(s["jain"].is_null(), "{s}");
        }
    }
    // The VMs column and Jain's index appear when a cell has several VMs.
    assert_eq!(header.contains("| VMs |"), vms > 1, "{header}");
    assert_eq!(header.contains("| Jain |"), vms > 1, "{header}");
    let medians = doc["medians"].as_array().expect("medians");
    assert_eq!(medians.len(), rows.len());
    for (m, row) in medians.iter().zip(&rows) {
        assert_eq!(m["system"].as_str(), Some(row[system].as_str()));
        assert_eq!(
            m["iops"].as_f64().unwrap().round(),
            row[iops].parse::<f64>().unwrap()
        );
        let (p50, p99, p999) = (
            m["p50_us"].as_f64().unwrap(),
            m["p99_us"].as_f64().unwrap(),
            m["p999_us"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p99 && p99 <= p999, "{m}");
    }
    let ratio_docs = doc["ratios"].as_array().expect("ratios");
    for reference in ["qsd", "io_uring", "fio"] {
        let n = ratio_docs
            .iter()
            .filter(|r| r["versus"] == reference)
            .inspect(|r| assert!(r["iops"].as_f64().is_some_and(|x| x > 0.0), "{r}"))
            .count();
        assert_eq!(n, vublk_cells(reference), "ratios against {reference}");
    }

    check_svg(svg, doc, media, systems);
}

/// The chart parses as XML and has two panels, each with a group per cell holding a bar per
/// system that ran there, each bar's value the median in the JSON.
fn check_svg(svg: &str, doc: &Value, media: &[&str], systems: &[&'static str]) {
    let xml = roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("bad SVG: {e}\n{svg}"));
    let root = xml.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    for attr in ["width", "height", "viewBox"] {
        assert!(root.attribute(attr).is_some(), "no {attr} on <svg>");
    }
    let class = |n: &roxmltree::Node, c: &str| n.is_element() && n.attribute("class") == Some(c);
    let panels: Vec<_> = root.children().filter(|n| class(n, "panel")).collect();
    let names: Vec<_> = panels.iter().map(|p| p.attribute("data-panel")).collect();
    assert_eq!(names, [Some("iops"), Some("cpu")]);
    let medians = doc["medians"].as_array().expect("medians");
    for panel in &panels {
        let cells: Vec<_> = panel.children().filter(|n| class(n, "cell")).collect();
        assert_eq!(cells.len(), media.len(), "one bar group per cell");
        for (cell, medium) in cells.iter().zip(media) {
            let label = cell.attribute("data-cell").expect("data-cell");
            assert!(label.starts_with(&format!("{medium} ")), "{label}");
            let bars: Vec<_> = cell.children().filter(|n| class(n, "bar")).collect();
            let drawn: BTreeSet<&str> = bars
                .iter()
                .map(|b| b.attribute("data-system").expect("data-system"))
                .collect();
            let ran: BTreeSet<&str> = systems_on(medium, systems).into_iter().collect();
            assert_eq!(drawn, ran, "bars of {label}");
            assert_eq!(bars.len(), ran.len(), "bars of {label}");
            for bar in &bars {
                let height: f64 = bar.attribute("height").unwrap().parse().unwrap();
                assert!(height > 0.0, "a bar of {label} has no height");
            }
            if panel.attribute("data-panel") == Some("iops") {
                for bar in &bars {
                    let s = bar.attribute("data-system").unwrap();
                    let value: f64 = bar.attribute("data-value").unwrap().parse().unwrap();
                    let median = medians
                        .iter()
                        .find(|m| m["cell"]["medium"] == *medium && m["system"] == s)
                        .and_then(|m| m["iops"].as_f64())
                        .unwrap_or_else(|| panic!("no median for {s} on {medium}"));
                    assert!((value - median).abs() <= 1e-6 * median, "{s} on {medium}");
                }
            }
            // A system that did not run in the cell is marked where its bar would be.
            let missing = systems.len() - ran.len();
            let na = cell
                .children()
                .filter(|n| n.is_element() && n.text() == Some("n/a"))
                .count();
            assert_eq!(na, missing, "n/a marks in {label}");
        }
    }
}

#[test]
fn smoke_matrix_gives_a_table_json_and_chart_for_every_system() {
    let dir = tempfile::tempdir().unwrap();
    // The default smoke matrix: tmpfs and null, random reads, interrupt-driven, one queue, every
    // system (io_uring has no null medium).
    let out = smoke(dir.path(), "default", &[]);
    check(&out, &["tmpfs", "null"], &["vublk", "qsd", "io_uring"], 1);
    assert_eq!(out.doc["samples"][0]["cell"]["client"], "interrupt");
    assert!(out.doc["samples"][0]["cell"]["rate"].is_null());
    assert!(
        !out.md.contains("rate IOPS"),
        "closed loop has no rate column"
    );
    assert!(
        out.md.contains("- fio is the disk's own limit"),
        "fio (a default system) is said to be left out of tmpfs and null:\n{}",
        out.md
    );
    // The peer is current QSD (scripts/prereqs.sh installs 10.0 from bookworm-backports), and
    // the report says which.
    let qsd = out.doc["setup"]["versions"]["qsd"].as_str().unwrap();
    let major: u32 = qsd
        .strip_prefix("qemu-storage-daemon version ")
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("not a QSD version: {qsd}"));
    assert!(major >= 10, "QSD {qsd} is older than 10.0");
}

#[test]
fn smoke_many_vms_on_one_daemon() {
    // Two VMs: a load generator each against an export each of one vublk (a worker per VM) or
    // one QSD (an iothread per export), and two io_uring generators on two images.
    let dir = tempfile::tempdir().unwrap();
    let out = smoke(dir.path(), "vms", &["--vms", "2"]);
    check(&out, &["tmpfs", "null"], &["vublk", "qsd", "io_uring"], 2);
    assert!(out.md.contains("| interrupt | 2 | vublk |"), "{}", out.md);
    assert!(
        out.svg.contains("iodepth 4 · 1 queue · 2 VMs"),
        "the chart says how many VMs"
    );
}

#[test]
fn smoke_fio_is_the_disks_own_limit() {
    // fio on the disk medium's image (O_DIRECT), next to the systems it is the limit for.
    let dir = tempfile::tempdir().unwrap();
    let disk_dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let args = [
        "--media",
        "disk",
        "--disk-dir",
        disk_dir.path().to_str().unwrap(),
        "--systems",
        "vublk,io_uring,fio",
    ];
    let out = smoke(dir.path(), "fio", &args);
    check(&out, &["disk"], &["vublk", "io_uring", "fio"], 1);
    assert!(
        out.doc["setup"]["versions"]["fio"]
            .as_str()
            .is_some_and(|v| v.starts_with("fio-")),
        "{}",
        out.doc["setup"]["versions"]
    );
}

#[test]
fn smoke_rbd_bench_is_the_clusters_own_limit() {
    // rbd bench on the rbd medium's image, next to vublk: its own row and a ratio table against
    // it. Skips without Ceph (scripts/prereqs.sh's `rbd`).
    if !vublk_test_support::ceph::installed() {
        eprintln!("skipping: {}", vublk_test_support::ceph::NOT_INSTALLED);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = smoke(
        dir.path(),
        "rbd",
        &["--media", "rbd", "--systems", "vublk,rbd-bench"],
    );
    let rows = table(&out.md, "IOPS");
    let systems: Vec<&str> = rows
        .iter()
        .map(|r| r[col(out.md.lines().next().unwrap(), "system")].as_str())
        .collect();
    assert_eq!(systems, ["vublk", "rbd-bench"], "{}", out.md);
    let ratios = table(&out.md, "IOPS ÷ rbd-bench");
    assert_eq!(ratios.len(), 1, "{}", out.md);
    let header = out
        .md
        .lines()
        .find(|l| l.contains("IOPS ÷ rbd-bench"))
        .unwrap();
    let ratio: f64 = ratios[0][col(header, "IOPS ÷ rbd-bench")]
        .trim_end_matches('×')
        .parse()
        .expect("an IOPS ratio");
    assert!(ratio.is_finite() && ratio > 0.0, "{ratios:?}");
    // rbd bench reports no latencies: no p50 ratio.
    assert_eq!(ratios[0][col(header, "p50 ÷ rbd-bench")], "–", "{ratios:?}");
    assert!(
        out.doc["setup"]["versions"]["rbd-bench"]
            .as_str()
            .is_some_and(|v| v.starts_with("ceph version")),
        "{}",
        out.doc["setup"]["versions"]
    );
    let samples = out.doc["samples"].as_array().expect("samples");
    let rbd: Vec<&Value> = samples
        .iter()
        .filter(|s| s["system"] == "rbd-bench")
        .collect();
    assert_eq!(rbd.len(), 1, "{samples:?}");
    assert!(rbd[0]["load"]["ios"].as_u64().unwrap() > 0, "{}", rbd[0]);
    assert!(rbd[0]["backend_cpu_s"].is_null(), "{}", rbd[0]);
    assert!(
        rbd[0]["load"]["client_cpu_s"].as_f64().unwrap() >= 0.0,
        "{}",
        rbd[0]
    );
}

#[test]
fn smoke_polled_multiqueue_mixed() {
    // The other paths of the load generator: poll queues (io_uring spins on its completion
    // queue instead), two of them, reads and writes.
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--media",
        "tmpfs,null",
        "--rw",
        "randrw",
        "--client",
        "poll",
        "--queues",
        "2",
    ];
    let out = smoke(dir.path(), "poll", &args);
    check(&out, &["tmpfs", "null"], &["vublk", "qsd", "io_uring"], 1);
    assert_eq!(out.doc["samples"][0]["cell"]["client"], "poll");
    assert_eq!(out.doc["samples"][0]["cell"]["queues"], 2);
}

#[test]
fn smoke_paced_runs_stay_at_their_rate() {
    // Paced load on interrupt-driven queues (the generator sleeps until the next request is due)
    // and on polled ones (it spins), for every system: whatever the machine's speed, no system
    // may complete more than it was asked for in the window.
    const RATE: f64 = 3000.0;
    const IODEPTH: f64 = 4.0;
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--media",
        "tmpfs",
        "--rate",
        "3k",
        "--client",
        "interrupt,poll",
        "--iodepth",
        "4",
    ];
    let out = smoke(dir.path(), "paced", &args);
    let samples = out.doc["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), 2 * 3, "{}", out.md);
    for s in samples {
        assert_eq!(s["cell"]["rate"], RATE, "{s}");
        let ios = s["load"]["ios"].as_f64().unwrap();
        let seconds = s["load"]["seconds"].as_f64().unwrap();
        assert!(ios > 0.0, "{s}");
        // In the window: the rate, plus what was in flight when it opened (with some slack).
        let most = RATE * seconds * 1.01 + 2.0 * IODEPTH + 1.0;
        assert!(ios <= most, "{ios} I/Os in {seconds} s at {RATE} IOPS: {s}");
    }
    let header = out.md.lines().next().unwrap();
    let rows = table(&out.md, "| medium | rw | iodepth");
    assert_eq!(rows.len(), 6);
    let rate = col(header, "rate IOPS");
    assert!(rows.iter().all(|r| r[rate] == "3000"), "{}", out.md);
    // The chart marks the rate in each paced group of the IOPS panel.
    let xml = roxmltree::Document::parse(&out.svg).expect("the SVG parses");
    let iops = xml
        .descendants()
        .find(|n| n.attribute("data-panel") == Some("iops"))
        .expect("an IOPS panel");
    let cells: Vec<_> = iops
        .children()
        .filter(|n| n.attribute("class") == Some("cell"))
        .collect();
    assert_eq!(cells.len(), 2, "interrupt and poll");
    for c in &cells {
        let lines = c
            .children()
            .filter(|n| n.has_tag_name("line") && n.attribute("class") == Some("rate"))
            .count();
        assert_eq!(lines, 1, "{:?}", c.attribute("data-cell"));
    }
}
