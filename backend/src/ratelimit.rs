//! Rate-limited logging of what a guest or a VMM can provoke, so a misbehaving tenant cannot
//! flood the host's log: a burst of lines, then one summary per interval.
//!
//! [`RateLimit`] is the bookkeeping, with injected clocks. [`VMM_LOG`] is the budget of the VMM
//! this process serves: every line a frontend can make us write over and over (a refused
//! message, a connection that comes and goes) goes through [`vmm_line!`].

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub struct RateLimit {
    interval: Duration,
    burst: u32,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    pub const fn new(burst: u32, interval: Duration) -> RateLimit {
        RateLimit {
            interval,
            burst,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Returns whether to log now, and how many events were suppressed since the last line.
    pub fn check(&mut self, now: Instant) -> Option<u64> {
        let fresh = self.window_ended(now);
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

    /// The events suppressed in a window that has ended by `now`, once: a summary is due
    /// even if no further event comes to carry it.
    pub fn due(&mut self, now: Instant) -> Option<u64> {
        if self.suppressed > 0 && self.window_ended(now) {
            Some(std::mem::take(&mut self.suppressed))
        } else {
            None
        }
    }

    /// Every suppressed event not reported yet, whatever the window (when nothing will follow).
    pub fn take_suppressed(&mut self) -> Option<u64> {
        (self.suppressed > 0).then(|| std::mem::take(&mut self.suppressed))
    }

    /// Nothing to remember: its window has ended and nothing is left to report.
    pub fn idle(&self, now: Instant) -> bool {
        self.suppressed == 0 && self.window_ended(now)
    }

    fn window_ended(&self, now: Instant) -> bool {
        self.window_start
            .is_none_or(|start| now.duration_since(start) >= self.interval)
    }
}

/// Lines the VMM may cause per [`VMM_LOG_INTERVAL`] before they are counted instead of written.
const VMM_LOG_BURST: u32 = 10;
const VMM_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The log budget of the VMM this process serves. A worker serves exactly one VM, so all its
/// connections are one tenant and share one budget; with `--single-process` it is the budget
/// of whichever frontends connect to the daemon.
pub static VMM_LOG: VmmLog = VmmLog::new(VMM_LOG_BURST, VMM_LOG_INTERVAL);

/// A [`RateLimit`] shared by the threads of one process that write lines a VMM caused, which
/// writes the summary line ("N earlier line(s) caused by the VMM left out") itself.
pub struct VmmLog {
    limit: Mutex<RateLimit>,
    burst: u32,
    interval: Duration,
}

impl VmmLog {
    pub const fn new(burst: u32, interval: Duration) -> VmmLog {
        VmmLog {
            limit: Mutex::new(RateLimit::new(burst, interval)),
            burst,
            interval,
        }
    }

    /// Whether a line may be written at `now`. If lines were left out before it, the summary
    /// is written first.
    pub fn admit(&self, now: Instant) -> bool {
        let verdict = self.lock().check(now);
        match verdict {
            Some(left_out) => {
                self.summarize(left_out);
                true
            }
            None => false,
        }
    }

    /// Writes the summary of a window that has ended, if lines were left out in it; called
    /// periodically so the count is written even when the VMM has gone quiet.
    pub fn flush(&self, now: Instant) {
        let due = self.lock().due(now);
        self.summarize(due.unwrap_or(0));
    }

    /// Writes the summary of every line left out so far (before the process exits).
    pub fn finish(&self) {
        let left_out = self.lock().take_suppressed();
        self.summarize(left_out.unwrap_or(0));
    }

    fn summarize(&self, left_out: u64) {
        if left_out > 0 {
            tracing::warn!(
                "{left_out} earlier line(s) caused by the VMM left out (at most {} are written per {} s)",
                self.burst,
                self.interval.as_secs()
            );
        }
    }

    fn lock(&self) -> MutexGuard<'_, RateLimit> {
        self.limit.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `vmm_line!(warn, "...", args)`: a `tracing` line at that level, written if [`VMM_LOG`]
/// admits it now. For every line a VMM can provoke; the arguments are only formatted when
/// the line is written.
macro_rules! vmm_line {
    ($level:ident, $($arg:tt)+) => {
        if $crate::ratelimit::VMM_LOG.admit(::std::time::Instant::now()) {
            ::tracing::$level!($($arg)+);
        }
    };
}
pub(crate) use vmm_line;

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

    #[test]
    fn a_summary_is_due_once_the_window_has_ended() {
        let mut limit = RateLimit::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(limit.due(t0), None, "nothing happened yet");
        assert_eq!(limit.check(t0), Some(0));
        assert_eq!(limit.due(t0 + s(20)), None, "nothing was left out");
        let t1 = t0 + s(30);
        assert_eq!(limit.check(t1), Some(0));
        assert_eq!(limit.check(t1), None);
        assert_eq!(limit.check(t1 + s(1)), None);
        assert_eq!(
            limit.due(t1 + s(9)),
            None,
            "the window is still open: more may be left out"
        );
        assert_eq!(limit.due(t1 + s(10)), Some(2));
        assert_eq!(limit.due(t1 + s(11)), None, "reported once");
        assert_eq!(
            limit.check(t1 + s(12)),
            Some(0),
            "the next line does not repeat the count"
        );
    }

    #[test]
    fn take_suppressed_reports_an_open_window_too() {
        let mut limit = RateLimit::new(1, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.take_suppressed(), None);
        assert_eq!(limit.check(t0), Some(0));
        assert_eq!(limit.check(t0), None);
        assert_eq!(limit.take_suppressed(), Some(1));
        assert_eq!(limit.take_suppressed(), None);
        // Still in the same window: the budget is spent, and the count starts again.
        assert_eq!(limit.check(t0), None);
        assert_eq!(limit.check(t0 + Duration::from_secs(10)), Some(1));
    }

    #[test]
    fn vmm_log_admits_a_burst_per_interval_across_threads() {
        let log = VmmLog::new(10, Duration::from_secs(10));
        let t0 = Instant::now();
        let admitted: usize = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..50).filter(|_| log.admit(t0)).count()))
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).sum()
        });
        assert_eq!(admitted, 10, "one budget for every thread of the process");
        assert!(!log.admit(t0 + Duration::from_secs(9)));
        assert_eq!(log.lock().due(t0 + Duration::from_secs(9)), None);
        assert!(
            log.admit(t0 + Duration::from_secs(10)),
            "a new window, and the summary went first"
        );
        assert_eq!(
            log.lock().take_suppressed(),
            None,
            "the summary took the count"
        );
    }
}
