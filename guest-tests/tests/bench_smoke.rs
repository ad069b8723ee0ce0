//! vublk-bench in smoke mode, so the benchmark does not rot: it must run both systems, print a
//! well-formed Markdown table and write a well-formed JSON document with non-zero IOPS for every
//! system in every cell. No timing is asserted: benchmarks are not tests.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

/// Runs `vublk-bench --smoke ARGS` writing its JSON and Markdown into `dir`; returns (stdout,
/// Markdown file, JSON document).
fn smoke(dir: &Path, name: &str, args: &[&str]) -> (String, String, Value) {
    let json = dir.join(format!("{name}.json"));
    let md = dir.join(format!("{name}.md"));
    let out = Command::new(env!("CARGO_BIN_EXE_vublk-bench"))
        .arg("--smoke")
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
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
    (stdout, md, doc)
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

fn col(header: &str, name: &str) -> usize {
    header
        .trim_matches('|')
        .split('|')
        .position(|c| c.trim() == name)
        .unwrap_or_else(|| panic!("no column {name:?} in {header}"))
}

/// Checks the table and the JSON of one smoke run that covered `media` with both systems.
fn check(stdout: &str, md: &str, doc: &Value, media: &[&str]) {
    assert_eq!(stdout, md, "the printed table and the Markdown file differ");

    // The results table: one row per medium and system, with IOPS > 0 and ordered percentiles.
    let header = md.lines().next().expect("a header line");
    let rows = table(md, "| medium | rw | iodepth");
    let (system, iops, p50, p99) = (
        col(header, "system"),
        col(header, "IOPS"),
        col(header, "p50 µs"),
        col(header, "p99 µs"),
    );
    assert_eq!(rows.len(), media.len() * 2, "rows: {rows:?}");
    for m in media {
        for s in ["vublk", "qsd"] {
            let row = rows
                .iter()
                .find(|r| r[0] == *m && r[system] == s)
                .unwrap_or_else(|| panic!("no {s} row for {m}:\n{md}"));
            let n = |i: usize| row[i].parse::<f64>().unwrap_or_else(|_| panic!("{row:?}"));
            assert!(n(iops) > 0.0, "{s} on {m} did no I/O: {row:?}");
            assert!(n(p50) > 0.0 && n(p50) <= n(p99), "{row:?}");
        }
    }
    // The ratio table: one row per medium, a finite positive ratio.
    let ratios = table(md, "IOPS ÷ QSD");
    assert_eq!(ratios.len(), media.len(), "{md}");
    for r in &ratios {
        let x: f64 = r[6].trim_end_matches('×').parse().expect("a ratio");
        assert!(x.is_finite() && x > 0.0, "{r:?}");
    }

    // The JSON: the setup, one sample per run, medians and ratios that agree with the table.
    assert_eq!(
        doc["setup"]["machine"]["cpus"].as_u64().map(|n| n > 0),
        Some(true)
    );
    assert!(doc["setup"]["versions"]["qsd"]
        .as_str()
        .is_some_and(|v| !v.is_empty()));
    let samples = doc["samples"].as_array().expect("samples");
    assert_eq!(samples.len(), media.len() * 2);
    for s in samples {
        assert!(s["load"]["ios"].as_u64().unwrap() > 0, "{s}");
        assert!(s["backend_cpu_s"].as_f64().unwrap() >= 0.0, "{s}");
    }
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
    assert_eq!(ratio_docs.len(), media.len());
    assert!(ratio_docs
        .iter()
        .all(|r| r["iops"].as_f64().is_some_and(|x| x > 0.0)));
}

#[test]
fn smoke_matrix_gives_a_table_and_json_for_both_systems() {
    let dir = tempfile::tempdir().unwrap();
    // The default smoke matrix: tmpfs and null, random reads, interrupt-driven, one queue.
    let (stdout, md, doc) = smoke(dir.path(), "default", &[]);
    check(&stdout, &md, &doc, &["tmpfs", "null"]);
    assert_eq!(doc["samples"][0]["cell"]["client"], "interrupt");
}

#[test]
fn smoke_polled_multiqueue_mixed() {
    // The other paths of the load generator: poll queues, two of them, reads and writes.
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--media", "null", "--rw", "randrw", "--client", "poll", "--queues", "2",
    ];
    let (stdout, md, doc) = smoke(dir.path(), "poll", &args);
    check(&stdout, &md, &doc, &["null"]);
    assert_eq!(doc["samples"][0]["cell"]["client"], "poll");
    assert_eq!(doc["samples"][0]["cell"]["queues"], 2);
}
