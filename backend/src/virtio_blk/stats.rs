//! What a device has served, counted per queue so queues never write a shared cache line.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::poll::Epoch;
use super::request::RequestKind;
use super::spec;

const STATUS_OK: u8 = spec::VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = spec::VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = spec::VIRTIO_BLK_S_UNSUPP as u8;

/// Request kinds in the order of [`DeviceTotals::by_kind`].
pub const KINDS: [RequestKind; 6] = [
    RequestKind::Read,
    RequestKind::Write,
    RequestKind::Flush,
    RequestKind::GetId,
    RequestKind::Discard,
    RequestKind::WriteZeroes,
];

/// Upper bounds of the latency histogram's buckets, in microseconds; a last bucket takes the
/// rest. From a polled null disk (a few microseconds) to a stalled backing (seconds).
pub const LATENCY_BOUNDS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000,
    1_000_000,
];
const BUCKETS: usize = LATENCY_BOUNDS_US.len() + 1;

fn kind_index(kind: RequestKind) -> usize {
    match kind {
        RequestKind::Read => 0,
        RequestKind::Write => 1,
        RequestKind::Flush => 2,
        RequestKind::GetId => 3,
        RequestKind::Discard => 4,
        RequestKind::WriteZeroes => 5,
    }
}

/// One queue's counters, on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct QueueStats {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Spells of polling, those that found work, and the time spent in them.
    polls: AtomicU64,
    poll_hits: AtomicU64,
    poll_ns: AtomicU64,
    /// Reads and writes done on the queue thread itself (no io_uring).
    inline: AtomicU64,
    /// Kicks received and interrupts sent.
    kicks: AtomicU64,
    calls: AtomicU64,
    /// The polling policy's epochs in each mode, [sleeping, polling], and their time.
    epochs: [AtomicU64; 2],
    epoch_ns: [AtomicU64; 2],
    /// Completed requests per kind ([`KINDS`]); refused chains have no kind.
    by_kind: [AtomicU64; KINDS.len()],
    /// Errors by the status the guest got: [IOERR, UNSUPP].
    by_status: [AtomicU64; 2],
    /// Requests taken from the ring and not yet returned.
    in_flight: AtomicU64,
    /// Completed requests by latency (taken from the ring to completed), and their sum.
    latency: [AtomicU64; BUCKETS],
    latency_ns: AtomicU64,
    /// Times the queue stopped taking requests for the export's QoS limits, and how long.
    throttled: AtomicU64,
    throttled_ns: AtomicU64,
}

impl QueueStats {
    /// Counts a completed request (only its own queue thread calls this, so a load and a
    /// store suffice: no read-modify-write on the I/O path).
    pub fn record(&self, kind: RequestKind, len: u64, status: u8, latency: std::time::Duration) {
        add(&self.requests, 1);
        add(&self.by_kind[kind_index(kind)], 1);
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BOUNDS_US.partition_point(|&bound| bound < us);
        add(&self.latency[bucket], 1);
        add(&self.latency_ns, latency.as_nanos() as u64);
        if status != STATUS_OK {
            self.record_error(status);
            return;
        }
        match kind {
            RequestKind::Read => add(&self.bytes_read, len),
            RequestKind::Write => add(&self.bytes_written, len),
            _ => {}
        }
    }

    /// Counts a spell of polling that lasted `spent` and found work or not.
    pub fn record_poll(&self, spent: std::time::Duration, hit: bool) {
        add(&self.polls, 1);
        add(&self.poll_hits, u64::from(hit));
        add(&self.poll_ns, spent.as_nanos() as u64);
    }

    /// Counts a spell of waiting for the QoS limits that lasted `spent`.
    pub fn record_throttled(&self, spent: std::time::Duration) {
        add(&self.throttled, 1);
        add(&self.throttled_ns, spent.as_nanos() as u64);
    }

    pub fn record_inline(&self) {
        add(&self.inline, 1);
    }

    pub fn record_kick(&self) {
        add(&self.kicks, 1);
    }

    /// Counts a call; by the queue thread, or by an engine's thread while it holds the queue's
    /// ring (direct.rs), which the queue thread then does not.
    pub fn record_call(&self) {
        add(&self.calls, 1);
    }

    /// Counts an epoch of the polling policy (poll.rs).
    pub fn record_epoch(&self, epoch: Epoch) {
        let mode = usize::from(epoch.polling);
        add(&self.epochs[mode], 1);
        add(&self.epoch_ns[mode], epoch.length.as_nanos() as u64);
    }

    /// Counts a chain refused before any I/O, with the status it got.
    pub fn record_refused(&self, status: u8) {
        add(&self.requests, 1);
        self.record_error(status);
    }

    fn record_error(&self, status: u8) {
        add(&self.errors, 1);
        match status {
            STATUS_IOERR => add(&self.by_status[0], 1),
            STATUS_UNSUPP => add(&self.by_status[1], 1),
            _ => {}
        }
    }

    /// The queue thread's count of requests in flight, after it changed.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n as u64, Ordering::Relaxed);
    }
}

fn add(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
}

/// Totals over a device's queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceTotals {
    pub requests: u64,
    pub errors: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    #[serde(default)]
    pub polls: u64,
    #[serde(default)]
    pub poll_hits: u64,
    #[serde(default)]
    pub poll_ns: u64,
    #[serde(default)]
    pub inline: u64,
    #[serde(default)]
    pub kicks: u64,
    #[serde(default)]
    pub calls: u64,
    /// Epochs of the polling policy spent polling and sleeping, and how long they lasted.
    #[serde(default)]
    pub polling_epochs: u64,
    #[serde(default)]
    pub polling_epoch_ns: u64,
    #[serde(default)]
    pub sleeping_epochs: u64,
    #[serde(default)]
    pub sleeping_epoch_ns: u64,
    /// Completed requests per kind, in the order of [`KINDS`].
    #[serde(default)]
    pub by_kind: [u64; KINDS.len()],
    /// Requests that failed with VIRTIO_BLK_S_IOERR and with VIRTIO_BLK_S_UNSUPP.
    #[serde(default)]
    pub ioerr: u64,
    #[serde(default)]
    pub unsupp: u64,
    #[serde(default)]
    pub in_flight: u64,
    /// Completed requests per latency bucket ([`LATENCY_BOUNDS_US`], then the rest; not
    /// cumulative), and the sum of their latencies.
    #[serde(default)]
    pub latency: [u64; BUCKETS],
    #[serde(default)]
    pub latency_ns: u64,
    /// Times queues stopped taking requests for the QoS limits, and how long they waited.
    #[serde(default)]
    pub throttled: u64,
    #[serde(default)]
    pub throttled_ns: u64,
}

/// One queue's request counts, shown with a `queue` label: how the load spreads over a
/// device's queues. Read from the same per-queue counters as [`DeviceTotals`], so keeping them
/// costs the queue threads nothing more.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueCounts {
    /// Completed requests per kind, in the order of [`KINDS`].
    pub by_kind: [u64; KINDS.len()],
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub in_flight: u64,
}

impl QueueCounts {
    /// Adds `other` (the same queue of another connection of the VM to the same export).
    pub fn add(&mut self, other: &QueueCounts) {
        self.by_kind
            .iter_mut()
            .zip(other.by_kind)
            .for_each(|(a, b)| *a = a.saturating_add(b));
        self.bytes_read = self.bytes_read.saturating_add(other.bytes_read);
        self.bytes_written = self.bytes_written.saturating_add(other.bytes_written);
        self.in_flight = self.in_flight.saturating_add(other.in_flight);
    }
}

/// Each queue's counts, in queue order.
pub fn per_queue(queues: &[QueueStats]) -> Vec<QueueCounts> {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    queues
        .iter()
        .map(|q| QueueCounts {
            by_kind: std::array::from_fn(|i| load(&q.by_kind[i])),
            bytes_read: load(&q.bytes_read),
            bytes_written: load(&q.bytes_written),
            in_flight: load(&q.in_flight),
        })
        .collect()
}

pub fn totals(queues: &[QueueStats]) -> DeviceTotals {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    queues
        .iter()
        .fold(DeviceTotals::default(), |t, q| DeviceTotals {
            by_kind: std::array::from_fn(|i| t.by_kind[i] + load(&q.by_kind[i])),
            ioerr: t.ioerr + load(&q.by_status[0]),
            unsupp: t.unsupp + load(&q.by_status[1]),
            in_flight: t.in_flight + load(&q.in_flight),
            latency: std::array::from_fn(|i| t.latency[i] + load(&q.latency[i])),
            latency_ns: t.latency_ns + load(&q.latency_ns),
            throttled: t.throttled + load(&q.throttled),
            throttled_ns: t.throttled_ns + load(&q.throttled_ns),
            requests: t.requests + q.requests.load(Ordering::Relaxed),
            errors: t.errors + q.errors.load(Ordering::Relaxed),
            bytes_read: t.bytes_read + q.bytes_read.load(Ordering::Relaxed),
            bytes_written: t.bytes_written + q.bytes_written.load(Ordering::Relaxed),
            polls: t.polls + q.polls.load(Ordering::Relaxed),
            poll_hits: t.poll_hits + q.poll_hits.load(Ordering::Relaxed),
            poll_ns: t.poll_ns + q.poll_ns.load(Ordering::Relaxed),
            inline: t.inline + q.inline.load(Ordering::Relaxed),
            kicks: t.kicks + q.kicks.load(Ordering::Relaxed),
            calls: t.calls + q.calls.load(Ordering::Relaxed),
            polling_epochs: t.polling_epochs + q.epochs[1].load(Ordering::Relaxed),
            polling_epoch_ns: t.polling_epoch_ns + q.epoch_ns[1].load(Ordering::Relaxed),
            sleeping_epochs: t.sleeping_epochs + q.epochs[0].load(Ordering::Relaxed),
            sleeping_epoch_ns: t.sleeping_epoch_ns + q.epoch_ns[0].load(Ordering::Relaxed),
        })
}
