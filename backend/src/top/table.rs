//! The table `vublk top` prints: a summary line, column heads, one line per VM and export.
//! Plain text, the same in the terminal and in `--batch` output.

use std::fmt::Write;

use super::rates::{Row, PERCENTILE};
use crate::virtio_blk::stats::LATENCY_BOUNDS_US;

/// Export names longer than this are shortened from the left (socket paths differ at the end).
const EXPORT_WIDTH: usize = 40;

/// The table for `rows`, `clock` being the wall-clock time to show, `delay` the refresh
/// interval; at most `max_rows` rows (a terminal's height).
pub fn render(rows: &[Row], clock: &str, delay: f64, max_rows: usize) -> String {
    let vms = {
        let mut pids: Vec<i32> = rows
            .iter()
            .filter_map(|r| r.vm.map(|(pid, _)| pid))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids.len()
    };
    let sum = |f: fn(&super::rates::Rates) -> f64| -> f64 {
        rows.iter().filter_map(|r| r.rates.as_ref()).map(f).sum()
    };
    let mut text = format!(
        "vublk top - {clock}, every {delay} s: {vms} VM(s), {} row(s); {:.0} IOPS, read {}, written {}\n",
        rows.len(),
        sum(|r| r.iops()),
        bandwidth(sum(|r| r.read_bytes)),
        bandwidth(sum(|r| r.written_bytes)),
    );
    let width = rows
        .iter()
        .map(|r| r.export.chars().count())
        .max()
        .unwrap_or(0)
        .clamp("EXPORT".len(), EXPORT_WIDTH);
    let high = format!("P{:.0}", PERCENTILE * 100.0);
    let _ = writeln!(
        text,
        "{:>8} {:>6} {:<width$} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>6} {:>5} {:>6} {:>8}",
        "VMM-PID",
        "UID",
        "EXPORT",
        "READ/s",
        "WRITE/s",
        "READ-B/s",
        "WRIT-B/s",
        "LAT-AVG",
        format!("LAT-{high}"),
        "INFLT",
        "POLL%",
        "CPU%",
        "REPORT"
    );
    for row in rows.iter().take(max_rows) {
        let (pid, uid) = row.vm.map_or(("-".into(), "-".into()), |(p, u)| {
            (p.to_string(), u.to_string())
        });
        let rates = row.rates.as_ref();
        let dash = || "-".to_string();
        let _ = writeln!(
            text,
            "{:>8} {:>6} {:<width$} {:>8} {:>8} {:>9} {:>9} {:>8} {:>8} {:>6} {:>5} {:>6} {:>8}",
            pid,
            uid,
            shorten(&row.export, width),
            rates.map_or_else(dash, |r| format!("{:.0}", r.reads)),
            rates.map_or_else(dash, |r| format!("{:.0}", r.writes)),
            rates.map_or_else(dash, |r| bytes(r.read_bytes)),
            rates.map_or_else(dash, |r| bytes(r.written_bytes)),
            rates
                .and_then(|r| r.latency_mean_us)
                .map_or_else(dash, latency),
            rates
                .and_then(|r| r.latency_high_us)
                .map_or_else(dash, high_latency),
            rates.map_or_else(dash, |r| r.in_flight.to_string()),
            rates
                .and_then(|r| r.polling_share)
                .map_or_else(dash, |s| format!("{:.0}", s * 100.0)),
            row.cpu_percent.map_or_else(dash, |c| format!("{c:.1}")),
            match row.report_age {
                None => dash(),
                Some(age) if row.stale() => format!("stale {age:.0}s"),
                Some(age) => format!("{age:.1}s"),
            },
        );
    }
    if rows.len() > max_rows {
        let _ = writeln!(text, "({} more)", rows.len() - max_rows);
    }
    text
}

/// `name` in at most `width` characters: its tail, after "..".
fn shorten(name: &str, width: usize) -> String {
    let len = name.chars().count();
    if len <= width {
        return name.to_string();
    }
    let tail: String = name.chars().skip(len - (width - 2)).collect();
    format!("..{tail}")
}

/// Bytes per second in at most 9 characters: `512`, `12.3K`, `48.2M`, `1.1G` (powers of 1024).
fn bytes(per_second: f64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if per_second < 1024.0 {
        return format!("{per_second:.0}");
    }
    let mut value = per_second / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1}{}", UNITS[unit])
}

/// Bytes per second with their unit: `512B/s`, `48.2MiB/s`.
fn bandwidth(per_second: f64) -> String {
    let b = bytes(per_second);
    if per_second < 1024.0 {
        format!("{b}B/s")
    } else {
        format!("{b}iB/s")
    }
}

/// Microseconds as `0.4us`, `17us`, `2.50ms`, `1.20s`; infinity (past the histogram) as `>1s`.
fn latency(us: f64) -> String {
    if us.is_infinite() {
        ">1s".into()
    } else if us < 10.0 {
        format!("{us:.1}us")
    } else if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 1e6 {
        format!("{:.2}ms", us / 1e3)
    } else {
        format!("{:.2}s", us / 1e6)
    }
}

/// A percentile: within the histogram's first bucket it is only known to be below its bound.
fn high_latency(us: f64) -> String {
    let first = LATENCY_BOUNDS_US[0] as f64;
    if us <= first {
        format!("<{first:.0}us")
    } else {
        latency(us)
    }
}

/// The time of day in UTC, `HH:MM:SS`.
pub fn clock_utc(now: std::time::SystemTime) -> String {
    let secs = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::super::rates::Rates;
    use super::*;

    #[test]
    fn a_table_shows_each_row_with_units() {
        let rows = vec![
            Row {
                vm: Some((4242, 1000)),
                export: format!("/run/{}/disk.sock", "x".repeat(60)),
                rates: Some(Rates {
                    reads: 1500.0,
                    writes: 2.0,
                    read_bytes: 1500.0 * 4096.0,
                    latency_mean_us: Some(0.42),
                    latency_high_us: Some(f64::INFINITY),
                    polling_share: Some(0.5),
                    ..Default::default()
                }),
                cpu_percent: Some(98.76),
                report_age: Some(0.25),
            },
            Row {
                vm: Some((7, 0)),
                export: "b".into(),
                rates: None,
                cpu_percent: None,
                report_age: Some(12.0),
            },
            Row {
                vm: None,
                export: "idle".into(),
                rates: Some(Rates::default()),
                cpu_percent: None,
                report_age: None,
            },
        ];
        let text = render(&rows, "12:00:00 UTC", 1.0, 10);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].contains("1502 IOPS") && lines[0].contains("read 5.9MiB/s"),
            "{text}"
        );
        let words: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(
            words,
            [
                "4242",
                "1000",
                &format!("..{}/disk.sock", "x".repeat(28)),
                "1500",
                "2",
                "5.9M",
                "0",
                "0.4us",
                ">1s",
                "0",
                "50",
                "98.8",
                "0.2s"
            ]
        );
        assert!(lines[3].ends_with("stale 12s"), "{text}");
        assert_eq!(
            lines[4].split_whitespace().collect::<Vec<_>>(),
            ["-", "-", "idle", "0", "0", "0", "0", "-", "-", "0", "-", "-", "-"]
        );
        assert!(render(&rows, "", 1.0, 1).ends_with("(2 more)\n"));
        assert_eq!(high_latency(9.9), "<10us");
        assert_eq!(high_latency(30.0), "30us");
        assert_eq!(latency(2500.0), "2.50ms");
    }

    #[test]
    fn the_clock_is_utc() {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400 * 3 + 3661);
        assert_eq!(clock_utc(t), "01:01:01 UTC");
    }
}
