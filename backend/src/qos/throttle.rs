//! A device's throttle: its buckets behind a lock, shared by its queue threads (the limit is
//! the device's, not each queue's), and replaced whole when `vublk export set` changes the
//! limits. Without a limit a queue thread reads one flag per batch and nothing else: no
//! clock, no lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Buckets, QosLimits};

/// What one batch of a queue thread may take ([`Throttle::quota`]) and took so far. Other
/// queue threads take from the same buckets meanwhile, so together they may start one bucket
/// too many each, once: what they took is counted all the same, and the average holds.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    room_ops: f64,
    room_bytes: f64,
    ops: u64,
    bytes: u64,
}

impl Quota {
    /// Whether another request may start: the buckets were not full with what the batch took
    /// so far (a request may overfill them).
    #[inline]
    pub fn may_start(&self) -> bool {
        self.ops as f64 <= self.room_ops && self.bytes as f64 <= self.room_bytes
    }

    /// Counts a request that started, moving `bytes`.
    #[inline]
    pub fn take(&mut self, bytes: u64) {
        self.ops += 1;
        self.bytes += bytes;
    }
}

#[derive(Debug)]
pub struct Throttle {
    /// Whether there is any limit: the queue loop's only look at the throttle without one.
    limited: AtomicBool,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    limits: QosLimits,
    buckets: Buckets,
}

impl Throttle {
    pub fn new(limits: QosLimits) -> Throttle {
        Throttle {
            limited: AtomicBool::new(!limits.is_unlimited()),
            state: Mutex::new(State {
                limits,
                buckets: Buckets::new(&limits, Instant::now()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any limit is set. A relaxed load, once per batch: a queue thread sees a change
    /// by its next batch, which is all `export set` promises.
    #[inline]
    pub fn limited(&self) -> bool {
        self.limited.load(Ordering::Relaxed)
    }

    /// Whether a request may start at `now` (`None`), or how long until one may.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.state().buckets.wait(now)
    }

    /// What a queue thread may start at `now`, for a batch: the room left in the buckets.
    pub fn quota(&self, now: Instant) -> Quota {
        let (ops, bytes) = self.state().buckets.room(now);
        Quota {
            room_ops: ops,
            room_bytes: bytes,
            ops: 0,
            bytes: 0,
        }
    }

    /// Counts what a batch took with `quota`, and says whether a request may start at `now`
    /// (`None`) or how long until one may.
    pub fn settle(&self, quota: &Quota, now: Instant) -> Option<Duration> {
        let mut state = self.state();
        state.buckets.account_many(quota.ops, quota.bytes);
        state.buckets.wait(now)
    }

    /// The limits in force.
    pub fn limits(&self) -> QosLimits {
        self.state().limits
    }

    /// Replaces the limits; the buckets start empty (as QEMU's `throttle_config` does).
    pub fn set(&self, limits: QosLimits) {
        let mut state = self.state();
        state.limits = limits;
        state.buckets = Buckets::new(&limits, Instant::now());
        self.limited
            .store(!limits.is_unlimited(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_replaces_the_limits_and_empties_the_buckets() {
        let throttle = Throttle::new(QosLimits::default());
        assert!(!throttle.limited());
        let limits = QosLimits {
            iops_limit: 10,
            ..Default::default()
        };
        throttle.set(limits);
        assert!(throttle.limited());
        assert_eq!(throttle.limits(), limits);
        let now = Instant::now();
        let mut quota = throttle.quota(now);
        // The slack: a tenth of a second, one request, and one more to overfill it.
        assert!(quota.may_start());
        quota.take(0);
        assert!(quota.may_start());
        quota.take(0);
        assert!(!quota.may_start());
        assert!(throttle.settle(&quota, now).is_some());
        assert!(throttle.wait(now).is_some());
        throttle.set(QosLimits {
            iops_limit: 20,
            ..Default::default()
        });
        assert_eq!(throttle.wait(Instant::now()), None);
        throttle.set(QosLimits::default());
        assert!(!throttle.limited());
    }
}
