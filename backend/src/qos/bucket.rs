//! The leaky buckets of one device, after QEMU's `util/throttle.c`, with the time passed in so
//! the arithmetic is tested on a clock the test controls.
//!
//! Each limited resource (requests, bytes) has a bucket that every request fills (one request,
//! its length in bytes) and that drains at the limit per second. A request may start while
//! every bucket is at or below its capacity; it is never refused for its size, so a request
//! larger than a bucket starts, overfills it, and those after it wait until it drained back
//! below the capacity. The capacity is a tenth of a second of the limit (short bursts of a
//! guest are not delayed one by one), or with a burst rate `B` it is `B` × 1 s, and a second
//! bucket, draining at `B` with a tenth of a second of `B`, holds the rate to `B` meanwhile.
//! Over time a device serves `limit` per second: what it took beyond that stays in the bucket.

use std::time::{Duration, Instant};

use super::QosLimits;

/// How long a burst rate may be kept up (QEMU's `*-max-length` default).
const BURST_LENGTH_SECS: f64 = 1.0;
/// A bucket's slack without a burst rate, in seconds of its limit (QEMU's choice).
const SLACK_SECS: f64 = 0.1;

/// One bucket: `level` units in it, draining at `rate` per second; full past `capacity`.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    rate: f64,
    capacity: f64,
    level: f64,
    /// Counts bytes (else requests).
    bytes: bool,
}

impl Bucket {
    fn new(rate: u64, capacity: f64, bytes: bool) -> Bucket {
        Bucket {
            rate: rate as f64,
            capacity,
            level: 0.0,
            bytes,
        }
    }

    /// How long until the level is back at the capacity; zero if it is there already.
    fn wait(&self) -> Duration {
        let extra = self.level - self.capacity;
        if extra <= 0.0 {
            return Duration::ZERO;
        }
        // Rounded up, so the wait ends with the bucket at (not a hair above) its capacity.
        Duration::from_nanos((extra / self.rate * 1e9).ceil() as u64)
    }
}

/// A device's buckets: up to two per limited resource.
#[derive(Debug, Clone)]
pub struct Buckets {
    buckets: Vec<Bucket>,
    /// When the levels were last drained.
    last: Instant,
}

impl Buckets {
    /// Empty buckets for `limits`, drained from `now` on.
    pub fn new(limits: &QosLimits, now: Instant) -> Buckets {
        let mut buckets = Vec::with_capacity(4);
        for (limit, burst, bytes) in [
            (limits.iops_limit, limits.iops_burst, false),
            (limits.bps_limit, limits.bps_burst, true),
        ] {
            if limit == 0 {
                continue;
            }
            if burst == 0 {
                buckets.push(Bucket::new(limit, limit as f64 * SLACK_SECS, bytes));
            } else {
                buckets.push(Bucket::new(limit, burst as f64 * BURST_LENGTH_SECS, bytes));
                buckets.push(Bucket::new(burst, burst as f64 * SLACK_SECS, bytes));
            }
        }
        Buckets { buckets, last: now }
    }

    /// Drains the buckets for the time since the last call.
    fn drain(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        for b in &mut self.buckets {
            b.level = (b.level - b.rate * elapsed).max(0.0);
        }
    }

    /// Whether a request may start at `now`: `None` if so, else how long until one may.
    pub fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.drain(now);
        let wait = self
            .buckets
            .iter()
            .map(Bucket::wait)
            .max()
            .unwrap_or_default();
        (!wait.is_zero()).then_some(wait)
    }

    /// Counts a request that started, moving `bytes`.
    pub fn account(&mut self, bytes: u64) {
        self.account_many(1, bytes);
    }

    /// Counts `requests` that started, moving `bytes` together.
    pub fn account_many(&mut self, requests: u64, bytes: u64) {
        for b in &mut self.buckets {
            b.level += if b.bytes {
                bytes as f64
            } else {
                requests as f64
            };
        }
    }

    /// The room left at `now` before the fullest bucket of requests, and of bytes, passes
    /// its capacity (infinite without such a bucket; negative when one is over): requests
    /// may start while what they add stays within it, and the one that passes it too.
    pub fn room(&mut self, now: Instant) -> (f64, f64) {
        self.drain(now);
        let room = |bytes: bool| {
            self.buckets
                .iter()
                .filter(|b| b.bytes == bytes)
                .map(|b| b.capacity - b.level)
                .fold(f64::INFINITY, f64::min)
        };
        (room(false), room(true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs a closed loop with always a request waiting, `bytes` each, for `length` on the
    /// injected clock, and returns the requests started (each as soon as the buckets let it).
    fn saturate(buckets: &mut Buckets, start: Instant, length: Duration, bytes: u64) -> u64 {
        let mut now = start;
        let mut started = 0;
        while now < start + length {
            match buckets.wait(now) {
                None => {
                    buckets.account(bytes);
                    started += 1;
                }
                Some(wait) => now += wait,
            }
        }
        started
    }

    #[test]
    fn no_limit_never_waits() {
        let t0 = Instant::now();
        let mut b = Buckets::new(&QosLimits::default(), t0);
        for _ in 0..1000 {
            b.account(1 << 20);
        }
        assert_eq!(b.wait(t0), None);
    }

    #[test]
    fn iops_hold_the_average_after_a_tenth_of_a_second_of_slack() {
        let t0 = Instant::now();
        let limits = QosLimits {
            iops_limit: 1000,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits, t0);
        // The slack: 100 requests (a tenth of a second's worth) and one more at once.
        assert_eq!(saturate(&mut b, t0, Duration::from_nanos(1), 4096), 101);
        // Then one per millisecond: 10 s bring 10,000 more, within the rounding of the waits.
        let later = saturate(&mut b, t0 + Duration::from_nanos(1), ms(10_000), 4096);
        assert!((9_999..=10_001).contains(&later), "{later}");
        // An idle second refills the slack, no more.
        let t1 = t0 + ms(20_000);
        assert_eq!(saturate(&mut b, t1, Duration::from_nanos(1), 4096), 101);
    }

    #[test]
    fn bps_count_bytes_and_a_request_larger_than_the_bucket_still_starts() {
        let t0 = Instant::now();
        let limits = QosLimits {
            bps_limit: 1 << 20,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits, t0);
        // 16 MiB: sixteen seconds' worth, 160 times the bucket. It starts...
        assert_eq!(b.wait(t0), None);
        b.account(16 << 20);
        // ...and the next waits until the bucket drained to its capacity (0.1 MiB).
        let wait = b.wait(t0).unwrap();
        assert!((ms(15_899)..=ms(15_901)).contains(&wait), "{wait:?}");
        assert!(b.wait(t0 + ms(15_000)).is_some());
        assert_eq!(b.wait(t0 + ms(15_901)), None);
        // 64 KiB requests: 16 per second on average.
        let t1 = t0 + ms(100_000);
        let n = saturate(&mut b, t1, ms(10_000), 64 << 10);
        // The slack (0.1 MiB: two requests, the second over it) and 160 more.
        assert!((161..=163).contains(&n), "{n}");
    }

    #[test]
    fn a_burst_runs_at_its_rate_until_its_bucket_is_full() {
        let t0 = Instant::now();
        let limits = QosLimits {
            iops_limit: 1000,
            iops_burst: 2000,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits, t0);
        // From idle: the burst bucket lets 200 go at once and then holds the rate to 2000/s;
        // the main bucket (2000) fills at 2000 - 1000 per second, so after 1.8 s the rate
        // drops to the limit. Over the first two seconds: what the main bucket holds (2000)
        // and what drained from it (2 × 1000).
        let first = saturate(&mut b, t0, ms(1000), 512);
        assert!((2_190..=2_210).contains(&first), "{first}");
        let second = saturate(&mut b, t0 + ms(1000), ms(1000), 512);
        assert!((1_790..=1_810).contains(&second), "{second}");
        let after = saturate(&mut b, t0 + ms(2000), ms(5000), 512);
        assert!((5_000..=5_010).contains(&after), "{after}");
    }

    #[test]
    fn both_limits_apply_the_tighter_wins() {
        let t0 = Instant::now();
        let limits = QosLimits {
            iops_limit: 1000,
            bps_limit: 1 << 20,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits, t0);
        // 4 KiB requests: the byte limit allows 256/s, the request limit 1000/s.
        let n = saturate(&mut b, t0, ms(10_000), 4096);
        assert!((2_580..=2_590).contains(&n), "{n}");
        // 512-byte requests: now the request limit is the tighter.
        let n = saturate(&mut b, t0 + ms(20_000), ms(10_000), 512);
        assert!((10_090..=10_110).contains(&n), "{n}");
    }

    /// Batches of a queue thread: room once, requests while it lasts, the batch counted.
    #[test]
    fn room_lets_a_batch_start_what_single_checks_would() {
        let t0 = Instant::now();
        let limits = QosLimits {
            iops_limit: 1000,
            iops_burst: 1500,
            bps_limit: 1 << 20,
            ..Default::default()
        };
        let (mut single, mut batched) = (Buckets::new(&limits, t0), Buckets::new(&limits, t0));
        let mut now = t0;
        for round in 0..200u64 {
            let len = 512 << (round % 5);
            let mut one_by_one = 0;
            while single.wait(now).is_none() {
                single.account(len);
                one_by_one += 1;
            }
            let (ops, bytes) = batched.room(now);
            let mut in_batch = 0u64;
            while in_batch as f64 <= ops && (in_batch * len) as f64 <= bytes {
                in_batch += 1;
            }
            batched.account_many(in_batch, in_batch * len);
            assert_eq!(in_batch, one_by_one, "round {round}");
            now += ms(7);
        }
    }

    #[test]
    fn a_clock_going_backwards_drains_nothing() {
        let t0 = Instant::now() + ms(1000);
        let limits = QosLimits {
            iops_limit: 10,
            ..Default::default()
        };
        let mut b = Buckets::new(&limits, t0);
        b.account(1);
        b.account(1);
        let wait = b.wait(t0 - ms(500)).unwrap();
        assert_eq!(b.wait(t0).unwrap(), wait);
    }
}
