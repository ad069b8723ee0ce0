//! The supervisor's side of `--metrics-addr`: its counters, the snapshot a scrape shows, and
//! the HTTP connections, served from its event loop (metrics/http.rs).
//!
//! A scrape reads only what the supervisor holds: each worker's last report (taken from its
//! pipe as it comes, about once a second) and the worker's CPU time from /proc/PID/stat, which
//! the kernel answers for a stopped process too. A worker's report is its tenant's word: only
//! the devices of connections the supervisor gave that worker are shown, under the export
//! name the supervisor knows, so a worker cannot add series or label values.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::metrics::{DeviceMetrics, ExportCounters, Next, Snapshot, VmMetrics};

use super::{Event, Supervisor};

/// What the supervisor counts for its metrics.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Per export index: connections handed to a worker, and reconnects among them.
    pub connections: Vec<u64>,
    pub reconnects: Vec<u64>,
    pub workers_started: u64,
    pub workers_failed: u64,
}

impl Counters {
    pub fn connected(&mut self, export: usize, reconnect: bool) {
        if self.connections.len() <= export {
            self.connections.resize(export + 1, 0);
            self.reconnects.resize(export + 1, 0);
        }
        self.connections[export] += 1;
        self.reconnects[export] += u64::from(reconnect);
    }
}

impl Supervisor {
    /// What a scrape shows now.
    pub(super) fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let count = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0);
        let exports = self
            .exports
            .iter()
            .enumerate()
            .filter(|(_, e)| e.listener.is_some())
            .map(|(i, e)| ExportCounters {
                name: e.spec.name.clone(),
                connections: count(&self.counters.connections, i),
                reconnects: count(&self.counters.reconnects, i),
            })
            .collect();
        let mut vms: Vec<VmMetrics> = self
            .vms
            .values()
            .map(|vm| {
                // Per export, the devices of connections this worker was given, summed.
                let mut per_export: BTreeMap<usize, DeviceMetrics> = BTreeMap::new();
                for device in &vm.devices {
                    let Some(&export) = vm.live.get(&device.connection) else {
                        continue;
                    };
                    let Some(spec) = self.exports.get(export).map(|e| &e.spec) else {
                        continue;
                    };
                    let sum = per_export.entry(export).or_insert_with(|| DeviceMetrics {
                        export: spec.name.clone(),
                        ..Default::default()
                    });
                    add_device(sum, device, usize::from(spec.device.num_queues));
                }
                VmMetrics {
                    vmm_pid: vm.vmm_pid,
                    uid: vm.uid,
                    cpu: cpu_seconds(vm.worker_pid),
                    report_age: vm
                        .reported_at
                        .map(|at| now.saturating_duration_since(at).as_secs_f64()),
                    devices: per_export.into_values().collect(),
                }
            })
            .collect();
        vms.sort_by_key(|vm| vm.vmm_pid);
        Snapshot {
            exports,
            workers_started: self.counters.workers_started,
            workers_failed: self.counters.workers_failed,
            vms,
        }
    }

    /// The metrics listener is readable: takes the new connections.
    pub(super) fn on_metrics_listener(&mut self) {
        let Some(server) = &mut self.metrics else {
            return;
        };
        for (id, stream) in server.accept(Instant::now()) {
            let _ = self.events.watch(stream, Event::MetricsClient(id));
        }
    }

    /// A metrics connection is ready to read or write.
    pub(super) fn on_metrics_client(&mut self, id: u64) {
        let Some(mut server) = self.metrics.take() else {
            return;
        };
        let next = server.on_ready(id, || self.snapshot().render());
        if next == Next::Write {
            if let Some(stream) = server.stream(id) {
                // Now watched for room to write (the request is read).
                self.events.unwatch(stream);
                if self
                    .events
                    .watch_writable(stream, Event::MetricsClient(id))
                    .is_err()
                {
                    server.close(id);
                }
            }
        }
        self.metrics = Some(server);
    }

    /// Closes metrics connections past their deadline.
    pub(super) fn expire_metrics(&mut self, now: Instant) {
        if let Some(server) = &mut self.metrics {
            for id in server.overdue(now) {
                server.close(id);
            }
        }
    }
}

/// Adds a worker's report of one device to the sum of its VM's devices on the export; at most
/// `num_queues` (the export's) queues, so a worker cannot add `queue` label values.
fn add_device(sum: &mut DeviceMetrics, device: &crate::handoff::DeviceStatus, num_queues: usize) {
    // Saturating: the numbers are the worker's word, and must not panic the supervisor.
    fn add(a: &mut u64, b: u64) {
        *a = a.saturating_add(b);
    }
    let (t, d) = (&mut sum.totals, &device.totals);
    add(&mut t.requests, d.requests);
    add(&mut t.errors, d.errors);
    add(&mut t.bytes_read, d.bytes_read);
    add(&mut t.bytes_written, d.bytes_written);
    add(&mut t.polls, d.polls);
    add(&mut t.poll_hits, d.poll_hits);
    add(&mut t.poll_ns, d.poll_ns);
    add(&mut t.inline, d.inline);
    add(&mut t.kicks, d.kicks);
    add(&mut t.calls, d.calls);
    add(&mut t.polling_epochs, d.polling_epochs);
    add(&mut t.polling_epoch_ns, d.polling_epoch_ns);
    add(&mut t.sleeping_epochs, d.sleeping_epochs);
    add(&mut t.sleeping_epoch_ns, d.sleeping_epoch_ns);
    t.by_kind
        .iter_mut()
        .zip(d.by_kind)
        .for_each(|(a, b)| add(a, b));
    add(&mut t.ioerr, d.ioerr);
    add(&mut t.unsupp, d.unsupp);
    add(&mut t.in_flight, d.in_flight);
    t.latency
        .iter_mut()
        .zip(d.latency)
        .for_each(|(a, b)| add(a, b));
    add(&mut t.latency_ns, d.latency_ns);
    add(&mut t.throttled, d.throttled);
    add(&mut t.throttled_ns, d.throttled_ns);
    let (m, d) = (&mut sum.memory, &device.memory);
    m.generation = m.generation.max(d.generation);
    // A generation is live in one device or another: at most a few per device.
    m.live.extend(d.live.iter().take(8).copied());
    add(&mut m.retire_waits, d.retire_waits);
    m.longest_retire_wait_us = m.longest_retire_wait_us.max(d.longest_retire_wait_us);
    add(&mut m.cancelled, d.cancelled);
    let queues = device.per_queue.iter().take(num_queues);
    if sum.per_queue.len() < queues.len() {
        sum.per_queue.resize(queues.len(), Default::default());
    }
    sum.per_queue
        .iter_mut()
        .zip(queues)
        .for_each(|(sum, queue)| sum.add(queue));
}

/// A process's CPU time in seconds (user, system), from /proc/PID/stat.
fn cpu_seconds(pid: i32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu(&stat, clock_ticks())
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a constant of the system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// utime and stime, fields 14 and 15 of /proc/PID/stat, counted after the command name (which
/// is in parentheses and may hold spaces and parentheses itself).
fn parse_stat_cpu(stat: &str, ticks: f64) -> Option<(f64, f64)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_comm.split_ascii_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some((user as f64 / ticks, system as f64 / ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu(stat, 100.0), Some((2.5, 0.75)));
        assert_eq!(parse_stat_cpu("1234 (x) S 1", 100.0), None);
    }

    /// A worker's per-queue counts are taken for at most the export's queues, and summed
    /// queue by queue over its connections to the export.
    #[test]
    fn a_worker_cannot_add_queues_past_its_export() {
        use crate::virtio_blk::stats::QueueCounts;
        let device = crate::handoff::DeviceStatus {
            connection: 1,
            export: "x".into(),
            queues: 2,
            totals: Default::default(),
            memory: Default::default(),
            write_cache: None,
            per_queue: vec![
                QueueCounts {
                    by_kind: [1, 0, 0, 0, 0, 0],
                    in_flight: 1,
                    ..Default::default()
                };
                1000
            ],
        };
        let mut sum = DeviceMetrics::default();
        add_device(&mut sum, &device, 2);
        add_device(&mut sum, &device, 2);
        assert_eq!(sum.per_queue.len(), 2);
        assert!(sum
            .per_queue
            .iter()
            .all(|q| q.by_kind[0] == 2 && q.in_flight == 2));
    }

    #[test]
    fn our_own_cpu_time_is_readable() {
        assert!(cpu_seconds(std::process::id() as i32).is_some());
    }
}
