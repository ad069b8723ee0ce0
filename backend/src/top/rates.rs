//! Rates from successive counter snapshots: what `vublk top` shows per VM and export.
//!
//! The counters of a device move when its worker reports (about once a second), not when top
//! asks, so a device's rates are its counters' change between two reports divided by the time
//! between those reports (each report's time is when top got the snapshot less the report's
//! age). Between reports a row keeps the rates of its last two; a row whose report is older
//! than [`STALE_AFTER`] (a stopped or hung worker) shows none and is marked stale. The worker's
//! CPU time is read by the supervisor when it answers, so CPU % is taken between snapshots.

use std::collections::HashMap;

use crate::metrics::Snapshot;
use crate::virtio_blk::request::RequestKind;
use crate::virtio_blk::stats::{DeviceTotals, KINDS, LATENCY_BOUNDS_US};

/// A worker reports about once a second: a report older than this is from a worker that is
/// stopped, hung or too busy to report.
pub const STALE_AFTER: f64 = 3.0;

/// The percentile top shows beside the mean latency.
pub const PERCENTILE: f64 = 0.99;

/// One line of the table: a VM's devices on one export, or an export no VM uses.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The VM (its VMM's pid and uid); `None` for an export no VM is connected to.
    pub vm: Option<(i32, u32)>,
    pub export: String,
    /// `None` until two reports of the device were seen, or when the last one is stale.
    pub rates: Option<Rates>,
    /// The VM's worker, all its devices together; `None` before two snapshots.
    pub cpu_percent: Option<f64>,
    /// Seconds since the worker's last report.
    pub report_age: Option<f64>,
}

impl Row {
    pub fn stale(&self) -> bool {
        self.report_age.is_some_and(|age| age > STALE_AFTER)
    }

    /// Requests completed per second, all kinds together: what rows are sorted by.
    pub fn iops(&self) -> f64 {
        self.rates.as_ref().map_or(0.0, |r| r.iops())
    }
}

/// What a device did per second between two reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rates {
    pub reads: f64,
    pub writes: f64,
    /// Flushes, discards, write-zeroes and GET_IDs.
    pub others: f64,
    pub read_bytes: f64,
    pub written_bytes: f64,
    /// Mean and [`PERCENTILE`] latency in microseconds of the requests completed between the
    /// two reports (`None` when none completed); the percentile is `f64::INFINITY` when it
    /// lies past the histogram's last bound.
    pub latency_mean_us: Option<f64>,
    pub latency_high_us: Option<f64>,
    /// Requests in flight at the later report.
    pub in_flight: u64,
    /// The share of the polling policy's time spent polling rather than sleeping on kicks
    /// (`None` when the policy ran no epoch, e.g. `--poll-max-us 0`).
    pub polling_share: Option<f64>,
}

impl Rates {
    pub fn iops(&self) -> f64 {
        self.reads + self.writes + self.others
    }

    /// The rates between `before` and `after`, `seconds` apart; `None` when a counter went
    /// backwards (a new device under the same VMM pid and export) or no time passed.
    fn between(before: &DeviceTotals, after: &DeviceTotals, seconds: f64) -> Option<Rates> {
        if seconds <= 0.0 || after.requests < before.requests {
            return None;
        }
        let delta = |a: u64, b: u64| b.saturating_sub(a) as f64;
        let per_second = |a: u64, b: u64| delta(a, b) / seconds;
        // KINDS starts with reads and writes.
        const _: () = assert!(matches!(KINDS[0], RequestKind::Read));
        const _: () = assert!(matches!(KINDS[1], RequestKind::Write));
        let completed: u64 = KINDS
            .iter()
            .enumerate()
            .map(|(i, _)| after.by_kind[i].saturating_sub(before.by_kind[i]))
            .sum();
        let reads = per_second(before.by_kind[0], after.by_kind[0]);
        let writes = per_second(before.by_kind[1], after.by_kind[1]);
        let buckets: Vec<u64> = after
            .latency
            .iter()
            .zip(before.latency)
            .map(|(a, b)| a.saturating_sub(b))
            .collect();
        let latencies: u64 = buckets.iter().sum();
        let polling = delta(before.polling_epoch_ns, after.polling_epoch_ns);
        let sleeping = delta(before.sleeping_epoch_ns, after.sleeping_epoch_ns);
        Some(Rates {
            reads,
            writes,
            others: (completed as f64 / seconds - reads - writes).max(0.0),
            read_bytes: per_second(before.bytes_read, after.bytes_read),
            written_bytes: per_second(before.bytes_written, after.bytes_written),
            latency_mean_us: (latencies > 0)
                .then(|| delta(before.latency_ns, after.latency_ns) / latencies as f64 / 1e3),
            latency_high_us: percentile(&buckets, PERCENTILE),
            in_flight: after.in_flight,
            polling_share: (polling + sleeping > 0.0).then(|| polling / (polling + sleeping)),
        })
    }
}

/// The latency (µs) below which `q` of the requests counted in `buckets` fell, interpolated
/// within its bucket as Prometheus' `histogram_quantile` does; `f64::INFINITY` past the last
/// bound; `None` for no requests.
pub fn percentile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count > 0 && (below + count) as f64 >= rank {
            let Some(&upper) = LATENCY_BOUNDS_US.get(i) else {
                return Some(f64::INFINITY);
            };
            let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] };
            let within = (rank - below as f64) / count as f64;
            return Some(lower as f64 + (upper - lower) as f64 * within);
        }
        below += count;
    }
    Some(f64::INFINITY)
}

/// A device's last report, and the rates between its last two.
struct Device {
    reported_at: f64,
    totals: DeviceTotals,
    rates: Option<Rates>,
}

/// What top remembers between snapshots.
#[derive(Default)]
pub struct Tracker {
    /// Per VMM pid and export.
    devices: HashMap<(i32, String), Device>,
    /// Per VMM pid: when the snapshot came, and the worker's CPU seconds then.
    cpu: HashMap<i32, (f64, f64)>,
}

impl Tracker {
    /// The table for `snapshot`, which arrived `now` seconds into top's run, sorted by IOPS
    /// (highest first).
    pub fn update(&mut self, snapshot: &Snapshot, now: f64) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut devices = HashMap::new();
        let mut cpu = HashMap::new();
        for vm in &snapshot.vms {
            let cpu_seconds = vm.cpu.map(|(user, system)| user + system);
            let cpu_percent = cpu_seconds.and_then(|seconds| {
                let (at, before) = self.cpu.get(&vm.vmm_pid)?;
                (now > *at && seconds >= *before).then(|| (seconds - before) / (now - at) * 100.0)
            });
            if let Some(seconds) = cpu_seconds {
                cpu.insert(vm.vmm_pid, (now, seconds));
            }
            let report_age = vm.report_age;
            let stale = report_age.is_some_and(|age| age > STALE_AFTER);
            for d in &vm.devices {
                let key = (vm.vmm_pid, d.export.clone());
                let reported_at = now - report_age.unwrap_or(0.0);
                let device = match self.devices.remove(&key) {
                    // A report newer than the last one seen (allowing for the jitter of
                    // taking its time from its age): rates between the two.
                    Some(last) if reported_at > last.reported_at + 0.1 => Device {
                        rates: Rates::between(
                            &last.totals,
                            &d.totals,
                            reported_at - last.reported_at,
                        ),
                        reported_at,
                        totals: d.totals.clone(),
                    },
                    Some(last) => last,
                    None => Device {
                        reported_at,
                        totals: d.totals.clone(),
                        rates: None,
                    },
                };
                rows.push(Row {
                    vm: Some((vm.vmm_pid, vm.uid)),
                    export: d.export.clone(),
                    rates: if stale { None } else { device.rates.clone() },
                    cpu_percent,
                    report_age,
                });
                devices.insert(key, device);
            }
        }
        // Exports nobody uses now: shown idle.
        for export in &snapshot.exports {
            if !rows.iter().any(|r| r.export == export.name) {
                rows.push(Row {
                    vm: None,
                    export: export.name.clone(),
                    rates: Some(Rates::default()),
                    cpu_percent: None,
                    report_age: None,
                });
            }
        }
        // VMs and devices that went away are forgotten.
        self.devices = devices;
        self.cpu = cpu;
        rows.sort_by(|a, b| {
            b.iops()
                .total_cmp(&a.iops())
                .then_with(|| a.vm.cmp(&b.vm))
                .then_with(|| a.export.cmp(&b.export))
        });
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{DeviceMetrics, ExportCounters, VmMetrics};

    fn totals(reads: u64, writes: u64) -> DeviceTotals {
        let mut t = DeviceTotals {
            requests: reads + writes,
            bytes_read: reads * 4096,
            bytes_written: writes * 512,
            ..Default::default()
        };
        t.by_kind[0] = reads;
        t.by_kind[1] = writes;
        // Every request took 20 µs: the second bucket (10-25 µs).
        t.latency[1] = reads + writes;
        t.latency_ns = (reads + writes) * 20_000;
        t
    }

    /// A VM in a test snapshot: VMM pid, CPU seconds, report age, devices.
    type TestVm<'a> = (i32, f64, f64, &'a [(&'a str, DeviceTotals)]);

    fn snapshot(vms: &[TestVm], exports: &[&str]) -> Snapshot {
        Snapshot {
            exports: exports
                .iter()
                .map(|name| ExportCounters {
                    name: name.to_string(),
                    ..Default::default()
                })
                .collect(),
            vms: vms
                .iter()
                .map(|(pid, cpu, age, devices)| VmMetrics {
                    vmm_pid: *pid,
                    uid: 1000,
                    cpu: Some((*cpu, 0.0)),
                    report_age: Some(*age),
                    devices: devices
                        .iter()
                        .map(|(export, totals)| DeviceMetrics {
                            export: export.to_string(),
                            totals: totals.clone(),
                            ..Default::default()
                        })
                        .collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn rates_are_taken_between_reports_and_sorted_by_iops() {
        let mut top = Tracker::default();
        let first = snapshot(
            &[
                (1, 1.0, 0.5, &[("a", totals(0, 0)), ("b", totals(100, 0))]),
                (2, 5.0, 0.2, &[("c", totals(0, 0))]),
            ],
            &["a", "b", "c", "idle"],
        );
        let rows = top.update(&first, 10.0);
        assert!(rows
            .iter()
            .filter(|r| r.vm.is_some())
            .all(|r| r.rates.is_none()));
        // Two seconds of reports later: a read 2000 and wrote 1000 requests, c nothing.
        let second = snapshot(
            &[
                (
                    1,
                    2.0,
                    0.5,
                    &[("a", totals(2000, 1000)), ("b", totals(100, 0))],
                ),
                (2, 5.5, 0.2, &[("c", totals(0, 0))]),
            ],
            &["a", "b", "c", "idle"],
        );
        let rows = top.update(&second, 12.0);
        let names: Vec<&str> = rows.iter().map(|r| r.export.as_str()).collect();
        assert_eq!(names[0], "a", "{rows:?}");
        let a = rows[0].rates.as_ref().unwrap();
        assert_eq!((a.reads, a.writes, a.others), (1000.0, 500.0, 0.0));
        assert_eq!(
            (a.read_bytes, a.written_bytes),
            (1000.0 * 4096.0, 500.0 * 512.0)
        );
        assert_eq!(a.latency_mean_us, Some(20.0));
        let high = a.latency_high_us.unwrap();
        assert!((10.0..=25.0).contains(&high), "{high}");
        assert_eq!(rows[0].cpu_percent, Some(50.0));
        for name in ["b", "c", "idle"] {
            let row = rows.iter().find(|r| r.export == name).unwrap();
            assert_eq!(row.iops(), 0.0, "{row:?}");
            assert!(row.rates.is_some(), "{row:?}");
        }
        assert_eq!(rows.iter().find(|r| r.export == "idle").unwrap().vm, None);
    }

    /// Asked again before the next report, a row keeps its rates; once its reports are
    /// stale it shows none, and a VM that went away goes from the table.
    #[test]
    fn rows_keep_their_rates_between_reports_and_lose_them_when_stale() {
        let mut top = Tracker::default();
        top.update(
            &snapshot(&[(1, 0.0, 0.0, &[("a", totals(0, 0))])], &["a"]),
            0.0,
        );
        top.update(
            &snapshot(&[(1, 0.0, 0.0, &[("a", totals(100, 0))])], &["a"]),
            1.0,
        );
        // No new report (it is 0.3 s older now).
        let rows = top.update(
            &snapshot(&[(1, 0.0, 0.3, &[("a", totals(100, 0))])], &["a"]),
            1.3,
        );
        assert_eq!(rows[0].iops(), 100.0);
        let rows = top.update(
            &snapshot(&[(1, 0.0, 5.0, &[("a", totals(100, 0))])], &["a"]),
            6.0,
        );
        assert!(rows[0].stale() && rows[0].rates.is_none(), "{rows:?}");
        let rows = top.update(&snapshot(&[], &["a"]), 7.0);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].vm, None);
    }

    #[test]
    fn percentiles_interpolate_within_their_bucket() {
        let mut buckets = [0u64; LATENCY_BOUNDS_US.len() + 1];
        assert_eq!(percentile(&buckets, 0.99), None);
        // 100 requests between 100 and 250 µs: the 99th is at 99% of that bucket.
        buckets[4] = 100;
        assert_eq!(percentile(&buckets, 0.99), Some(100.0 + 150.0 * 0.99));
        // Two in 1000 past the last bound: the 99th stays in the bucket below.
        buckets[4] = 998;
        buckets[LATENCY_BOUNDS_US.len()] = 2;
        assert!(percentile(&buckets, 0.99).unwrap() < 250.0);
        buckets[LATENCY_BOUNDS_US.len()] = 200;
        assert_eq!(percentile(&buckets, 0.99), Some(f64::INFINITY));
    }
}
