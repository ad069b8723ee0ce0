//! `--metrics-addr`: the daemon's numbers for Prometheus. [`exposition`] writes a
//! [`Snapshot`] in the text exposition format; [`http`] answers `GET /metrics` from the
//! supervisor's event loop. The supervisor builds the snapshot from what it keeps anyway
//! (supervisor/metrics.rs): its own counters, its workers' last reports, and their CPU time
//! from /proc. It never asks a worker at scrape time, so a stopped worker cannot hold a
//! scrape: its numbers are as old as its last report (`vublk_worker_report_age_seconds`).

pub mod exposition;
pub mod http;

pub use exposition::{DeviceMetrics, ExportCounters, Snapshot, VmMetrics};
pub use http::{MetricsServer, Next};
