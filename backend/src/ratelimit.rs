//! Rate-limited logging of guest-triggered events, so a misbehaving guest cannot flood the
//! host's log: a burst of lines, then one summary per interval.

use std::time::{Duration, Instant};

pub struct RateLimit {
    interval: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(burst: u32, interval: Duration) -> RateLimit {
        RateLimit { interval, burst, window_start: None, in_window: 0, suppressed: 0 }
    }

    /// Returns whether to log now, and how many events were suppressed since the last line.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let fresh = self.window_start.is_none_or(|start| now.duration_since(start) >= self.interval);
        if fresh {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports_the_count() {
        let mut limit = RateLimit::new(2, Duration::from_secs(5));
        let t0 = Instant::now();
        assert_eq!(limit.check(t0), Some(0));
        assert_eq!(limit.check(t0), Some(0));
        assert_eq!(limit.check(t0), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(6)), Some(2));
    }
}
