//! What a device has served, counted per queue so queues never write a shared cache line.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::poll::Epoch;
use super::request::RequestKind;

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
}

impl QueueStats {
    /// Counts a completed request (only its own queue thread calls this, so a load and a
    /// store suffice: no read-modify-write on the I/O path).
    pub fn record(&self, kind: RequestKind, len: u64, ok: bool) {
        add(&self.requests, 1);
        if !ok {
            add(&self.errors, 1);
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

    pub fn record_inline(&self) {
        add(&self.inline, 1);
    }

    pub fn record_kick(&self) {
        add(&self.kicks, 1);
    }

    pub fn record_call(&self) {
        add(&self.calls, 1);
    }

    /// Counts an epoch of the polling policy (poll.rs).
    pub fn record_epoch(&self, epoch: Epoch) {
        let mode = usize::from(epoch.polling);
        add(&self.epochs[mode], 1);
        add(&self.epoch_ns[mode], epoch.length.as_nanos() as u64);
    }

    /// Counts a chain refused before any I/O.
    pub fn record_refused(&self) {
        add(&self.requests, 1);
        add(&self.errors, 1);
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
}

pub fn totals(queues: &[QueueStats]) -> DeviceTotals {
    queues
        .iter()
        .fold(DeviceTotals::default(), |t, q| DeviceTotals {
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
