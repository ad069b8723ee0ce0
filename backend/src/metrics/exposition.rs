//! What `GET /metrics` shows: a [`Snapshot`] of the daemon's numbers, written in the
//! Prometheus text exposition format by the `prometheus-client` crate. Every metric is listed
//! with its labels in docs/operations.md.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use serde::{Deserialize, Serialize};

use crate::vhost_user::MemoryStatus;
use crate::virtio_blk::request::RequestKind;
use crate::virtio_blk::stats::{DeviceTotals, QueueCounts, KINDS, LATENCY_BOUNDS_US};

/// The daemon's numbers at one scrape; also the answer to the control socket's `Counters`
/// request (`vublk top`), in JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub exports: Vec<ExportCounters>,
    /// Workers that exec'd, and those that failed to start (or died while their VMM lived).
    pub workers_started: u64,
    pub workers_failed: u64,
    pub vms: Vec<VmMetrics>,
}

/// Per export, counted by the supervisor.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ExportCounters {
    pub name: String,
    /// Connections handed to a worker.
    pub connections: u64,
    /// Connections of a VMM that had connected to this export before.
    pub reconnects: u64,
}

/// One VM: its worker and, per export it is connected to, what its devices served.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct VmMetrics {
    pub vmm_pid: i32,
    pub uid: u32,
    /// The worker's CPU time (user, system) in seconds; `None` when /proc could not say.
    pub cpu: Option<(f64, f64)>,
    /// Seconds since the worker's last report; `None` before its first.
    pub report_age: Option<f64>,
    pub devices: Vec<DeviceMetrics>,
}

/// The devices of one VM on one export (connections summed).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct DeviceMetrics {
    pub export: String,
    pub totals: DeviceTotals,
    pub memory: MemoryStatus,
    /// Each queue's counts (connections summed queue by queue), for the `queue` label.
    #[serde(default)]
    pub per_queue: Vec<QueueCounts>,
}

impl Snapshot {
    /// The text of `GET /metrics`.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry);
        text
    }
}

type Labels = Vec<(&'static str, String)>;

fn kind_name(kind: RequestKind) -> &'static str {
    match kind {
        RequestKind::Read => "read",
        RequestKind::Write => "write",
        RequestKind::Flush => "flush",
        RequestKind::GetId => "get_id",
        RequestKind::Discard => "discard",
        RequestKind::WriteZeroes => "write_zeroes",
    }
}

/// One metric family being written.
struct Family<'a> {
    encoder: MetricEncoder<'a>,
}

fn family<'a>(
    encoder: &'a mut DescriptorEncoder,
    name: &'a str,
    help: &str,
    kind: MetricType,
) -> Result<Family<'a>, std::fmt::Error> {
    Ok(Family {
        encoder: encoder.encode_descriptor(name, help, None, kind)?,
    })
}

impl Family<'_> {
    fn counter(&mut self, labels: &Labels, value: impl CounterValue) -> std::fmt::Result {
        let mut sample = self.encoder.encode_family(labels)?;
        value.encode_counter(&mut sample)
    }

    fn gauge(&mut self, labels: &Labels, value: f64) -> std::fmt::Result {
        self.encoder.encode_family(labels)?.encode_gauge(&value)
    }
}

/// Counters are whole numbers of events or bytes, or seconds.
trait CounterValue {
    fn encode_counter(self, sample: &mut MetricEncoder) -> std::fmt::Result;
}

impl CounterValue for u64 {
    fn encode_counter(self, sample: &mut MetricEncoder) -> std::fmt::Result {
        sample.encode_counter::<NoLabelSet, u64, u64>(&self, None)
    }
}

impl CounterValue for f64 {
    fn encode_counter(self, sample: &mut MetricEncoder) -> std::fmt::Result {
        sample.encode_counter::<NoLabelSet, f64, f64>(&self, None)
    }
}

fn seconds(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// A device's labels, with `extra` added.
fn with(base: &Labels, extra: &[(&'static str, &str)]) -> Labels {
    let mut labels = base.clone();
    labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    labels
}

/// A counter family with one sample per device: `value` reads it from the totals.
fn device_counter<V: CounterValue>(
    encoder: &mut DescriptorEncoder,
    devices: &[(Labels, &DeviceMetrics)],
    name: &str,
    help: &str,
    value: impl Fn(&DeviceMetrics) -> V,
) -> std::fmt::Result {
    let mut f = family(encoder, name, help, MetricType::Counter)?;
    for (labels, device) in devices {
        f.counter(labels, value(device))?;
    }
    Ok(())
}

fn device_gauge(
    encoder: &mut DescriptorEncoder,
    devices: &[(Labels, &DeviceMetrics)],
    name: &str,
    help: &str,
    value: impl Fn(&DeviceMetrics) -> f64,
) -> std::fmt::Result {
    let mut f = family(encoder, name, help, MetricType::Gauge)?;
    for (labels, device) in devices {
        f.gauge(labels, value(device))?;
    }
    Ok(())
}

/// The per-queue families: the device's request counts split by its `queue` label (separate
/// names, so that summing a family never counts a request twice).
fn encode_queues(
    e: &mut DescriptorEncoder,
    devices: &[(Labels, &DeviceMetrics)],
) -> std::fmt::Result {
    let queues = || {
        devices.iter().flat_map(|(labels, d)| {
            d.per_queue
                .iter()
                .enumerate()
                .map(move |(i, q)| (with(labels, &[("queue", &i.to_string())]), q))
        })
    };
    let mut f = family(
        e,
        "vublk_queue_requests",
        "Requests completed, by queue and type (vublk_requests split by queue)",
        MetricType::Counter,
    )?;
    for (labels, q) in queues() {
        for (i, kind) in KINDS.iter().enumerate() {
            f.counter(&with(&labels, &[("type", kind_name(*kind))]), q.by_kind[i])?;
        }
    }
    let mut f = family(
        e,
        "vublk_queue_read_bytes",
        "Bytes read for the guest, by queue",
        MetricType::Counter,
    )?;
    for (labels, q) in queues() {
        f.counter(&labels, q.bytes_read)?;
    }
    let mut f = family(
        e,
        "vublk_queue_written_bytes",
        "Bytes written for the guest, by queue",
        MetricType::Counter,
    )?;
    for (labels, q) in queues() {
        f.counter(&labels, q.bytes_written)?;
    }
    let mut f = family(
        e,
        "vublk_queue_requests_in_flight",
        "Requests taken from the queue's ring and not yet completed",
        MetricType::Gauge,
    )?;
    for (labels, q) in queues() {
        f.gauge(&labels, q.in_flight as f64)?;
    }
    Ok(())
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let e = &mut encoder;
        let no_labels: Labels = Vec::new();

        let mut f = family(
            e,
            "vublk_connections",
            "Connections handed to a worker, per export",
            MetricType::Counter,
        )?;
        for export in &self.exports {
            f.counter(&vec![("export", export.name.clone())], export.connections)?;
        }
        let mut f = family(e, "vublk_reconnects", "Connections of a VMM that had connected to the export before (a reconnect), per export", MetricType::Counter)?;
        for export in &self.exports {
            f.counter(&vec![("export", export.name.clone())], export.reconnects)?;
        }
        family(
            e,
            "vublk_workers_started",
            "Workers that started (exec'd)",
            MetricType::Counter,
        )?
        .counter(&no_labels, self.workers_started)?;
        family(
            e,
            "vublk_worker_failures",
            "Workers that failed to start, or died while their VMM lived",
            MetricType::Counter,
        )?
        .counter(&no_labels, self.workers_failed)?;
        family(
            e,
            "vublk_workers",
            "Workers alive, serving a VM or retiring",
            MetricType::Gauge,
        )?
        .gauge(&no_labels, self.vms.len() as f64)?;

        let vm_labels = |vm: &VmMetrics| -> Labels {
            vec![
                ("vmm_pid", vm.vmm_pid.to_string()),
                ("uid", vm.uid.to_string()),
            ]
        };
        let mut f = family(
            e,
            "vublk_worker_cpu_seconds",
            "CPU time of the VM's worker (its queue threads included), by mode",
            MetricType::Counter,
        )?;
        for vm in &self.vms {
            if let Some((user, system)) = vm.cpu {
                f.counter(&with(&vm_labels(vm), &[("mode", "user")]), user)?;
                f.counter(&with(&vm_labels(vm), &[("mode", "system")]), system)?;
            }
        }
        let mut f = family(e, "vublk_worker_report_age_seconds", "Time since the worker last reported its devices' numbers (about every second; a stopped worker's numbers are this old)", MetricType::Gauge)?;
        for vm in &self.vms {
            if let Some(age) = vm.report_age {
                f.gauge(&vm_labels(vm), age)?;
            }
        }

        let devices: Vec<(Labels, &DeviceMetrics)> = self
            .vms
            .iter()
            .flat_map(|vm| {
                vm.devices.iter().map(move |d| {
                    let mut labels = vec![("export", d.export.clone())];
                    labels.extend(vm_labels(vm));
                    (labels, d)
                })
            })
            .collect();

        let mut f = family(e, "vublk_requests", "Requests completed, by type (chains refused before any I/O are counted in vublk_errors only)", MetricType::Counter)?;
        for (labels, d) in &devices {
            for (i, kind) in KINDS.iter().enumerate() {
                f.counter(
                    &with(labels, &[("type", kind_name(*kind))]),
                    d.totals.by_kind[i],
                )?;
            }
        }
        let mut f = family(
            e,
            "vublk_errors",
            "Requests that failed, by the status the guest got (ioerr, unsupp)",
            MetricType::Counter,
        )?;
        for (labels, d) in &devices {
            f.counter(&with(labels, &[("status", "ioerr")]), d.totals.ioerr)?;
            f.counter(&with(labels, &[("status", "unsupp")]), d.totals.unsupp)?;
        }
        device_counter(
            e,
            &devices,
            "vublk_read_bytes",
            "Bytes read for the guest",
            |d| d.totals.bytes_read,
        )?;
        device_counter(
            e,
            &devices,
            "vublk_written_bytes",
            "Bytes written for the guest",
            |d| d.totals.bytes_written,
        )?;
        device_gauge(
            e,
            &devices,
            "vublk_requests_in_flight",
            "Requests taken from the rings and not yet completed",
            |d| d.totals.in_flight as f64,
        )?;
        encode_queues(e, &devices)?;

        let mut f = e.encode_descriptor(
            "vublk_request_latency_seconds",
            "Time from taking a request from its ring to completing it",
            None,
            MetricType::Histogram,
        )?;
        for (labels, d) in &devices {
            let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
                .iter()
                .map(|&us| us as f64 / 1e6)
                .chain([f64::INFINITY])
                .zip(d.totals.latency)
                .collect();
            let count = d.totals.latency.iter().sum();
            f.encode_family(labels)?.encode_histogram::<NoLabelSet>(
                seconds(d.totals.latency_ns),
                count,
                &buckets,
                None,
            )?;
        }

        device_counter(
            e,
            &devices,
            "vublk_poll_seconds",
            "Time queue threads spent busy-polling their rings",
            |d| seconds(d.totals.poll_ns),
        )?;
        device_counter(e, &devices, "vublk_polls", "Spells of busy-polling", |d| {
            d.totals.polls
        })?;
        device_counter(
            e,
            &devices,
            "vublk_poll_hits",
            "Spells of busy-polling that found a request",
            |d| d.totals.poll_hits,
        )?;
        let mut f = family(e, "vublk_policy_seconds", "Time the queues' polling policy spent in each mode (polling: busy-polls before sleeping; sleeping: waits for kicks)", MetricType::Counter)?;
        for (labels, d) in &devices {
            f.counter(
                &with(labels, &[("mode", "polling")]),
                seconds(d.totals.polling_epoch_ns),
            )?;
            f.counter(
                &with(labels, &[("mode", "sleeping")]),
                seconds(d.totals.sleeping_epoch_ns),
            )?;
        }
        device_counter(
            e,
            &devices,
            "vublk_kicks",
            "Kicks (notifications) received from the driver",
            |d| d.totals.kicks,
        )?;
        device_counter(
            e,
            &devices,
            "vublk_interrupts",
            "Interrupts (calls) sent to the driver",
            |d| d.totals.calls,
        )?;
        device_counter(
            e,
            &devices,
            "vublk_inline_requests",
            "Reads and writes done on the queue thread itself rather than through io_uring",
            |d| d.totals.inline,
        )?;
        device_counter(
            e,
            &devices,
            "vublk_throttled_seconds",
            "Time queue threads waited, taking no request, because the export was over its QoS limits",
            |d| seconds(d.totals.throttled_ns),
        )?;
        device_counter(
            e,
            &devices,
            "vublk_throttle_waits",
            "Times a queue thread stopped taking requests because the export was over its QoS limits",
            |d| d.totals.throttled,
        )?;

        device_gauge(
            e,
            &devices,
            "vublk_memory_generation",
            "Number of the current guest memory table (it grows with every change of the table)",
            |d| d.memory.generation as f64,
        )?;
        device_gauge(e, &devices, "vublk_memory_generations_live", "Guest memory tables still mapped: the current one and those retiring, pinned by requests", |d| d.memory.live.len() as f64)?;
        device_counter(
            e,
            &devices,
            "vublk_memory_retire_waits",
            "Memory table changes that waited for requests using the old table",
            |d| d.memory.retire_waits,
        )?;
        device_gauge(
            e,
            &devices,
            "vublk_memory_retire_wait_longest_seconds",
            "Longest wait for a retiring memory table",
            |d| d.memory.longest_retire_wait_us as f64 / 1e6,
        )?;
        device_counter(
            e,
            &devices,
            "vublk_memory_cancelled_requests",
            "Requests cancelled because their memory was retiring past --retire-timeout",
            |d| d.memory.cancelled,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        let mut totals = DeviceTotals {
            requests: 7,
            bytes_read: 4096,
            ..Default::default()
        };
        totals.by_kind[0] = 5;
        totals.latency[0] = 3;
        totals.latency[15] = 2;
        totals.latency_ns = 2_000_000_000;
        Snapshot {
            exports: vec![ExportCounters {
                name: "disk \"0\"".into(),
                connections: 2,
                reconnects: 1,
            }],
            workers_started: 1,
            workers_failed: 0,
            vms: vec![VmMetrics {
                vmm_pid: 42,
                uid: 1000,
                cpu: Some((1.5, 0.25)),
                report_age: Some(0.5),
                devices: vec![DeviceMetrics {
                    export: "disk \"0\"".into(),
                    totals,
                    memory: MemoryStatus::default(),
                    per_queue: vec![
                        QueueCounts {
                            by_kind: [3, 0, 0, 0, 0, 0],
                            ..Default::default()
                        },
                        QueueCounts {
                            by_kind: [2, 0, 0, 0, 0, 0],
                            in_flight: 1,
                            ..Default::default()
                        },
                    ],
                }],
            }],
        }
    }

    #[test]
    fn samples_carry_their_labels_and_values() {
        let text = snapshot().render();
        for line in [
            "# TYPE vublk_requests_total counter",
            r#"vublk_requests_total{export="disk \"0\"",vmm_pid="42",uid="1000",type="read"} 5"#,
            r#"vublk_read_bytes_total{export="disk \"0\"",vmm_pid="42",uid="1000"} 4096"#,
            r#"vublk_worker_cpu_seconds_total{vmm_pid="42",uid="1000",mode="user"} 1.5"#,
            r#"vublk_reconnects_total{export="disk \"0\""} 1"#,
            r#"vublk_request_latency_seconds_bucket{export="disk \"0\"",vmm_pid="42",uid="1000",le="1e-05"} 3"#,
            r#"vublk_request_latency_seconds_bucket{export="disk \"0\"",vmm_pid="42",uid="1000",le="+Inf"} 5"#,
            r#"vublk_request_latency_seconds_sum{export="disk \"0\"",vmm_pid="42",uid="1000"} 2.0"#,
            "vublk_workers 1.0",
            r#"vublk_queue_requests_total{export="disk \"0\"",vmm_pid="42",uid="1000",queue="0",type="read"} 3"#,
            r#"vublk_queue_requests_total{export="disk \"0\"",vmm_pid="42",uid="1000",queue="1",type="read"} 2"#,
            r#"vublk_queue_requests_in_flight{export="disk \"0\"",vmm_pid="42",uid="1000",queue="1"} 1.0"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in\n{text}"
            );
        }
    }
}
