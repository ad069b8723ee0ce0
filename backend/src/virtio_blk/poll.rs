//! How long a queue thread busy-polls its avail ring before it sleeps (an adaptive window), and
//! whether polling pays at all on its queue ([`PollPolicy`], below).
//!
//! A queue thread with nothing to do may spin for a while, watching the avail index and the
//! completion queue, instead of re-enabling kicks and sleeping. When the driver adds a chain
//! inside the window, neither side pays a wakeup: the driver does not kick (notifications
//! stay off while polling) and the thread does not sleep. Polling is CPU, and that CPU is the
//! VM's: the queue thread belongs to the VM's worker, in the VMM's cgroups.
//!
//! The window adapts the way QEMU's AioContext polling and KVM's halt polling do
//! (util/aio-posix.c, virt/kvm/kvm_main.c), from how long each idle spell lasted (polling plus
//! any sleep after it) until there was work again:
//!
//! ```text
//!  idle ≤ window            polling caught the work: keep the window
//!  window < idle ≤ max      a longer window would have caught it: grow (×2, from 4 µs)
//!  idle > max               no window would have: shrink (÷2; below 4 µs, off)
//! ```
//!
//! Shrinking halves rather than resets (QEMU's `poll-shrink=2`, KVM's `halt_poll_ns_shrink`):
//! on a busy queue one late request (a preempted vCPU on the driver's side) would otherwise
//! throw away a window that took several spells to grow. An idle queue still stops polling
//! after a handful of spells, having spent less than twice the ceiling on them, and a window
//! of zero stays zero until an idle spell ends within the ceiling.

use std::time::{Duration, Instant};

/// The first window after polling was off.
const START: Duration = Duration::from_micros(4);

#[derive(Debug, Clone, Copy)]
pub struct PollWindow {
    max: Duration,
    current: Duration,
}

impl PollWindow {
    /// `max` zero disables polling.
    pub fn new(max: Duration) -> PollWindow {
        PollWindow {
            max,
            current: Duration::ZERO,
        }
    }

    /// How long to poll before sleeping now.
    pub fn window(&self) -> Duration {
        self.current
    }

    /// Opens the window to the ceiling.
    pub fn open(&mut self) {
        self.current = self.max;
    }

    /// Learns from an idle spell that lasted `idle` (the poll and any sleep after it).
    pub fn after_idle(&mut self, idle: Duration) {
        if self.max.is_zero() || idle <= self.current {
            return;
        }
        self.current = if idle > self.max {
            let half = self.current / 2;
            if half < START {
                Duration::ZERO
            } else {
                half
            }
        } else if self.current.is_zero() {
            START.min(self.max)
        } else {
            (self.current * 2).min(self.max)
        };
    }
}

/// Whether polling is worth its CPU on this queue, judged by what it bought.
///
/// Polling pays when it turns into throughput: a driver waiting on each completion (iodepth 1,
/// or a batch ping-pong at iodepth 32) issues more requests when neither side sleeps. Under a
/// load that does not speed up (a paced driver, or one bound by its own CPU) it buys nothing,
/// and a thread spinning through 50 µs gaps costs more CPU per request than a wake-up per
/// request would. So the queue thread runs in epochs of 25 ms in the mode that did better, and
/// now and then tries the other for one short epoch (5 ms: a try costs what the worse mode
/// costs).
///
/// A try is compared with the preferred epochs right before and after it, which ran at nearly
/// the same moment: this host's speed drifts by 2x over seconds, and tries judged against
/// averages of older epochs measured that drift as often as the modes. Even so one try says
/// little: at iodepth 32 on tmpfs, single tries put polling at 0.45x to 3.5x sleeping's rate,
/// and under a paced load of 20k per second, where both modes serve the same, a try now and
/// then caught the driver catching up and measured 1.3x or 2x. So the policy goes by the
/// median of the last [`RECENT_TRIES`] tries (of polling's rate and CPU per request as
/// multiples of sleeping's, each taken apart), which one such try does not move:
///
/// ```text
///  polling served ≥ 10% more requests per second,
///    at no more than twice the CPU per request            poll
///  polling cost ≥ 10% less thread CPU per request         poll
///  otherwise                                             sleep
/// ```
///
/// The CPU ceiling on the first rule is for paced drivers: their rate is the same either way,
/// but an epoch catches their bursts and stalls, and polling that won on such noise would spin
/// through the gaps at 2-3x the CPU per request (at 20k per second, iodepth 32). Where
/// neither mode clearly wins, the thread sleeps and leaves the CPU to the VM's other threads.
///
/// The other mode is tried again after [`EXPLORE_FIRST`] epochs. Once there are
/// [`RECENT_TRIES`] tries to go by, each whose own verdict agrees with the preference doubles
/// the wait, up to [`EXPLORE_LAST`] epochs (3.2 s: 1/128 of the time in the worse mode, which
/// matters to a paced driver's CPU per request); a try that disagrees, or a change of
/// preference, starts it over, so the median gets samples quickly where the choice is close.
///
/// Thread CPU time (CLOCK_THREAD_CPUTIME_ID, one system call per epoch) counts everything the
/// thread spent: spins, wake-ups, the work. An epoch lasts at least until it has served
/// [`MIN_REQUESTS`] requests; one that has not after [`QUIET`] (an idle queue, where the window
/// collapses by itself) tells nothing: a try is abandoned, and comes again after the same wait.
#[derive(Debug)]
pub struct PollPolicy {
    window: PollWindow,
    polling: bool,
    preferred: bool,
    /// The last tries, polling against sleeping (a ring: try n is at n % RECENT_TRIES), and
    /// how many there have been.
    recent: [Comparison; RECENT_TRIES],
    tries: usize,
    /// Preferred epochs left before the other mode is tried, and the wait after that.
    until_explore: u32,
    explore_every: u32,
    /// Whether the queue thread has ticked yet.
    started: bool,
    epoch_start: Instant,
    cpu_start: Duration,
    requests_start: u64,
    /// The last preferred epoch (`None` if it was quiet)...
    before: Option<EpochCost>,
    /// ...and the try that followed it, judged when the preferred epoch after it ends.
    tried: Option<EpochCost>,
}

/// Length of an epoch in the preferred mode, and of one that tries the other (short: it costs
/// what the worse mode costs). Either goes on until [`MIN_REQUESTS`] have been served.
const EPOCH: Duration = Duration::from_millis(25);
const TRY_EPOCH: Duration = Duration::from_millis(5);
/// Preferred epochs before the other mode is tried, at first and at most.
const EXPLORE_FIRST: u32 = 8;
const EXPLORE_LAST: u32 = 128;
/// The tries the policy goes by (their median).
const RECENT_TRIES: usize = 5;
/// An epoch goes on until it has served this many requests, to be judged by them (with 64, a
/// 5 ms try under a paced load of 20k per second caught the driver's catch-up bursts and
/// stalls: sleeping measured 11-17k, and a "faster" polling won on noise)...
const MIN_REQUESTS: u64 = 256;
/// ...or until it has lasted this long: fewer than about 1000 requests per second is a quiet
/// queue, whose epoch gives no verdict (the window collapses there by itself).
const QUIET: Duration = Duration::from_millis(250);
/// Polling must serve this much more to be kept at a higher CPU cost...
const THROUGHPUT_GAIN: f64 = 1.10;
/// ...and at no more than this times sleeping's CPU per request...
const THROUGHPUT_CPU_CEILING: f64 = 2.0;
/// ...or cost this much less CPU per request. (With "polling costs no more", a paced driver,
/// whose two modes cost about the same while the window is collapsed, had the thread poll for
/// 30-40% of its epochs on a coin toss of the measurement noise.)
const CPU_SAVING: f64 = 0.90;

/// An epoch that ended: which mode it ran in, and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Epoch {
    pub polling: bool,
    pub length: Duration,
}

/// What one epoch served and cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochCost {
    /// Requests per second.
    pub rate: f64,
    /// Thread CPU nanoseconds per request.
    pub cpu_per_request: f64,
}

impl EpochCost {
    fn mean(self, other: EpochCost) -> EpochCost {
        EpochCost {
            rate: (self.rate + other.rate) / 2.0,
            cpu_per_request: (self.cpu_per_request + other.cpu_per_request) / 2.0,
        }
    }
}

/// Polling against sleeping: polling's rate and CPU per request as multiples of sleeping's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub rate: f64,
    pub cpu_per_request: f64,
}

impl Comparison {
    /// `None` unless both ratios are positive numbers.
    pub fn of(sleeping: EpochCost, polling: EpochCost) -> Option<Comparison> {
        let rate = polling.rate / sleeping.rate;
        let cpu_per_request = polling.cpu_per_request / sleeping.cpu_per_request;
        let usable = |ratio: f64| ratio.is_finite() && ratio > 0.0;
        (usable(rate) && usable(cpu_per_request)).then_some(Comparison {
            rate,
            cpu_per_request,
        })
    }

    /// Whether polling did better.
    pub fn polling_wins(self) -> bool {
        let cpu = self.cpu_per_request;
        (self.rate >= THROUGHPUT_GAIN && cpu <= THROUGHPUT_CPU_CEILING) || cpu <= CPU_SAVING
    }

    /// The median of each ratio over `tries` (not empty).
    fn median(tries: &[Comparison]) -> Comparison {
        let median = |ratio: fn(&Comparison) -> f64| {
            let mut values = [0.0; RECENT_TRIES];
            let values = &mut values[..tries.len()];
            for (value, comparison) in values.iter_mut().zip(tries) {
                *value = ratio(comparison);
            }
            values.sort_by(f64::total_cmp);
            let middle = values.len() / 2;
            if values.len() % 2 == 1 {
                values[middle]
            } else {
                (values[middle - 1] + values[middle]) / 2.0
            }
        };
        Comparison {
            rate: median(|c| c.rate),
            cpu_per_request: median(|c| c.cpu_per_request),
        }
    }
}

impl PollPolicy {
    /// `max` zero disables polling.
    pub fn new(max: Duration) -> PollPolicy {
        PollPolicy {
            window: PollWindow::new(max),
            polling: true,
            preferred: true,
            recent: [Comparison {
                rate: 1.0,
                cpu_per_request: 1.0,
            }; RECENT_TRIES],
            tries: 0,
            // The first epoch is followed by a try.
            until_explore: 0,
            explore_every: EXPLORE_FIRST,
            started: false,
            // Set on the queue thread's first tick (`started`).
            epoch_start: Instant::now(),
            cpu_start: Duration::ZERO,
            requests_start: 0,
            before: None,
            tried: None,
        }
    }

    /// Whether polling is on at all (`--poll-max-us` not zero).
    pub(super) fn enabled(&self) -> bool {
        !self.window.max.is_zero()
    }

    /// How long to poll before sleeping now: zero in a sleeping epoch.
    pub fn window(&self) -> Duration {
        if self.polling {
            self.window.window()
        } else {
            Duration::ZERO
        }
    }

    /// Learns from an idle spell (see [`PollWindow::after_idle`]); spells spent sleeping
    /// say nothing about what polling would catch.
    pub fn after_idle(&mut self, idle: Duration) {
        if self.polling {
            self.window.after_idle(idle);
        }
    }

    /// Called once per round with the number of requests the thread has completed so far; at
    /// the end of an epoch, measures it and picks the next epoch's mode. Returns the epoch
    /// that ended, if one did.
    pub fn tick(&mut self, now: Instant, requests: u64) -> Option<Epoch> {
        self.advance(now, requests, thread_cpu)
    }

    /// [`tick`](Self::tick), with the thread's CPU clock read through `cpu` (only when an
    /// epoch ends: one system call per epoch, not per round).
    fn advance(
        &mut self,
        now: Instant,
        requests: u64,
        cpu: impl FnOnce() -> Duration,
    ) -> Option<Epoch> {
        if !self.enabled() {
            return None;
        }
        if !self.started {
            // The policy is built on the thread that sets the queue up; the CPU clock is the
            // queue thread's, read from the first round on.
            self.started = true;
            (self.epoch_start, self.cpu_start, self.requests_start) = (now, cpu(), requests);
            return None;
        }
        let length = if self.polling == self.preferred {
            EPOCH
        } else {
            TRY_EPOCH
        };
        let elapsed = now.duration_since(self.epoch_start);
        // An epoch lasts until it has served enough requests to judge by, or the queue turns
        // out to be quiet: a try of sleeping at 6k requests per second needs 43 ms, and ending
        // it at 5 ms without a verdict would leave the thread sleeping until the load changes.
        if elapsed < length || (requests - self.requests_start < MIN_REQUESTS && elapsed < QUIET) {
            return None;
        }
        Some(self.end_epoch(now, requests, cpu()))
    }

    /// Measures the epoch that ends at `now`, the thread having used `cpu` in all so far, and
    /// picks the next one's mode.
    fn end_epoch(&mut self, now: Instant, requests: u64, cpu: Duration) -> Epoch {
        let served = requests - self.requests_start;
        let ended = Epoch {
            polling: self.polling,
            length: now.duration_since(self.epoch_start),
        };
        let cost = (served >= MIN_REQUESTS).then(|| EpochCost {
            rate: served as f64 / ended.length.as_secs_f64(),
            cpu_per_request: cpu.saturating_sub(self.cpu_start).as_nanos() as f64 / served as f64,
        });
        let polling = self.next_mode(cost);
        if polling && !self.polling {
            // Polling resumes with the widest window, which shrinks within a few spells if
            // it is too wide: a try that started from a collapsed window would measure
            // sleeping twice.
            self.window.open();
        }
        self.polling = polling;
        self.epoch_start = now;
        self.cpu_start = cpu;
        self.requests_start = requests;
        ended
    }

    /// Learns from the epoch that ended (`cost`, `None` if the queue was quiet) and picks the
    /// next one's mode: the preferred one, or the other to measure it again.
    fn next_mode(&mut self, cost: Option<EpochCost>) -> bool {
        if self.polling != self.preferred {
            // A try, judged when the preferred epoch after it ends; a quiet one is abandoned.
            self.tried = cost;
            if cost.is_none() {
                self.until_explore = self.explore_every;
            }
            return self.preferred;
        }
        if let Some(tried) = self.tried.take() {
            self.judge(tried, cost);
        }
        // This epoch is the one before the next try, unless the preference just changed. A try
        // waits for a preferred epoch that served enough to compare with.
        self.before = if self.polling == self.preferred {
            cost
        } else {
            None
        };
        if self.until_explore == 0 {
            return if self.before.is_some() {
                !self.preferred
            } else {
                self.preferred
            };
        }
        self.until_explore -= 1;
        self.preferred
    }

    /// Judges a try against the preferred epochs before it and `after` it.
    fn judge(&mut self, tried: EpochCost, after: Option<EpochCost>) {
        let around = match (self.before, after) {
            (Some(before), Some(after)) => before.mean(after),
            (Some(one), None) | (None, Some(one)) => one,
            (None, None) => {
                self.until_explore = self.explore_every;
                return;
            }
        };
        let (sleeping, polling) = if self.preferred {
            (tried, around)
        } else {
            (around, tried)
        };
        let Some(sample) = Comparison::of(sleeping, polling) else {
            self.until_explore = self.explore_every;
            return;
        };
        self.recent[self.tries % RECENT_TRIES] = sample;
        self.tries += 1;
        let trusted = self.tries >= RECENT_TRIES;
        let preferred =
            Comparison::median(&self.recent[..self.tries.min(RECENT_TRIES)]).polling_wins();
        self.explore_every =
            if trusted && preferred == self.preferred && sample.polling_wins() == preferred {
                (self.explore_every * 2).min(EXPLORE_LAST)
            } else {
                EXPLORE_FIRST
            };
        self.preferred = preferred;
        self.until_explore = self.explore_every;
    }

    /// Whether this epoch polls.
    #[cfg(test)]
    pub fn polling(&self) -> bool {
        self.enabled() && self.polling
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn disabled_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        for idle in [us(1), us(3), us(100)] {
            w.after_idle(idle);
            assert_eq!(w.window(), Duration::ZERO);
        }
    }

    #[test]
    fn short_idle_spells_grow_the_window_up_to_max() {
        let mut w = PollWindow::new(us(50));
        assert_eq!(w.window(), Duration::ZERO, "starts off");
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.after_idle(us(45));
            seen.push(w.window());
        }
        assert_eq!(seen, [us(4), us(8), us(16), us(32), us(50), us(50)]);
    }

    #[test]
    fn long_idle_spells_halve_the_window_until_polling_stops() {
        let mut w = PollWindow::new(us(50));
        for _ in 0..5 {
            w.after_idle(us(45));
        }
        assert_eq!(w.window(), us(50));
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.after_idle(us(1000));
            seen.push(w.window());
        }
        assert_eq!(
            seen,
            [
                us(25),
                us(12) + Duration::from_nanos(500),
                Duration::from_nanos(6250),
                Duration::ZERO,
                Duration::ZERO,
                Duration::ZERO
            ]
        );
        // Back to short spells: it grows again from the start.
        w.after_idle(us(30));
        assert_eq!(w.window(), us(4));
    }

    fn cost(rate: f64, cpu_per_request: f64) -> EpochCost {
        EpochCost {
            rate,
            cpu_per_request,
        }
    }

    fn prefer_polling(sleeping: EpochCost, polling: EpochCost) -> bool {
        Comparison::of(sleeping, polling)
            .expect("positive costs")
            .polling_wins()
    }

    #[test]
    fn polling_is_kept_when_it_buys_throughput_even_at_a_higher_cpu_cost() {
        // A closed-loop driver at iodepth 1: 31k requests/s polling against 4.7k sleeping.
        assert!(prefer_polling(
            cost(4_700.0, 20_000.0),
            cost(31_000.0, 30_000.0)
        ));
        // 10% more is enough, 5% is not when it costs more.
        assert!(prefer_polling(
            cost(100_000.0, 1_000.0),
            cost(111_000.0, 1_500.0)
        ));
        assert!(!prefer_polling(
            cost(100_000.0, 1_000.0),
            cost(105_000.0, 1_500.0)
        ));
        // Nor is more throughput at over twice the CPU per request.
        assert!(prefer_polling(
            cost(100_000.0, 1_000.0),
            cost(130_000.0, 2_000.0)
        ));
        assert!(!prefer_polling(
            cost(100_000.0, 1_000.0),
            cost(130_000.0, 2_100.0)
        ));
    }

    #[test]
    fn at_equal_throughput_polling_must_be_clearly_cheaper() {
        // A paced driver: the same rate either way.
        assert!(!prefer_polling(
            cost(20_000.0, 30_000.0),
            cost(20_000.0, 50_000.0)
        ));
        assert!(prefer_polling(
            cost(20_000.0, 30_000.0),
            cost(20_000.0, 25_000.0)
        ));
        // Neither clearly cheaper: sleep.
        assert!(!prefer_polling(
            cost(20_000.0, 30_000.0),
            cost(20_000.0, 30_000.0)
        ));
        assert!(!prefer_polling(
            cost(20_000.0, 30_000.0),
            cost(20_000.0, 28_000.0)
        ));
    }

    #[test]
    fn the_median_takes_each_ratio_apart_and_ignores_one_outlier() {
        let c = |rate, cpu_per_request| Comparison {
            rate,
            cpu_per_request,
        };
        let tries = [
            c(1.0, 2.5),
            c(2.0, 1.2),
            c(0.9, 2.9),
            c(1.02, 2.4),
            c(1.05, 2.6),
        ];
        assert_eq!(Comparison::median(&tries), c(1.02, 2.5));
        assert!(
            !Comparison::median(&tries).polling_wins(),
            "the lucky try alone would win: {:?}",
            tries[1]
        );
        assert_eq!(Comparison::median(&tries[..2]), c(1.5, 1.85));
        assert_eq!(Comparison::median(&tries[..1]), tries[0]);
        assert_eq!(Comparison::of(cost(0.0, 1.0), cost(1.0, 1.0)), None);
    }

    /// Drives a policy through `epochs` epochs; `epoch(index, polling)` says how many requests
    /// an epoch in that mode serves and how much CPU it uses. Returns each epoch's mode.
    fn run_epochs(
        p: &mut PollPolicy,
        epochs: usize,
        epoch: impl Fn(usize, bool) -> (u64, Duration),
    ) -> Vec<bool> {
        let mut modes = Vec::new();
        let (mut now, mut requests, mut cpu) = (p.epoch_start, p.requests_start, p.cpu_start);
        for index in 0..epochs {
            let polling = p.polling();
            modes.push(polling);
            let (served, used) = epoch(index, polling);
            now += EPOCH;
            requests += served;
            cpu += used;
            p.end_epoch(now, requests, cpu);
        }
        modes
    }

    /// The same 2000 requests per epoch either way; polling spins through the gaps.
    fn paced(_: usize, polling: bool) -> (u64, Duration) {
        (2000, Duration::from_millis(if polling { 20 } else { 8 }))
    }

    /// Closed loop at iodepth 1: polling serves 6.7x the requests at 1.5x the CPU each.
    fn closed(_: usize, polling: bool) -> (u64, Duration) {
        if polling {
            (3200, Duration::from_millis(20))
        } else {
            (480, Duration::from_millis(2))
        }
    }

    /// The epochs that tried the mode that is not `preferred`, after the first try and the
    /// epoch that judged it.
    fn tries(modes: &[bool], preferred: bool) -> Vec<usize> {
        (3..modes.len())
            .filter(|&i| modes[i] != preferred)
            .collect()
    }

    #[test]
    fn a_paced_driver_gets_a_sleeping_thread_that_still_tries_polling_now_and_then() {
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 300, paced);
        assert!(
            modes[0] && !modes[1] && modes[2] && !modes[3],
            "measures polling, sleeping around it, then sleeps: {modes:?}"
        );
        // Tries polling again after 8 sleeping epochs until it has 5 tries to go by, then
        // after 16, 32, 64 and 128 (each try is followed by the epoch that judges it).
        assert_eq!(
            tries(&modes, false),
            [11, 21, 31, 41, 59, 93, 159, 289],
            "{modes:?}"
        );
    }

    #[test]
    fn a_driver_that_speeds_up_keeps_a_polling_thread() {
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 200, closed);
        assert_eq!(
            tries(&modes, true),
            [11, 21, 31, 41, 59, 93, 159],
            "{modes:?}"
        );
    }

    #[test]
    fn when_the_load_changes_the_policy_follows_within_a_few_tries() {
        // Paced first (sleeping wins), then the driver runs closed loop (polling wins).
        let mut p = PollPolicy::new(us(200));
        run_epochs(&mut p, 100, paced);
        assert!(!p.preferred, "sleeps under a paced load");
        let modes = run_epochs(&mut p, 200, closed);
        let settled = modes
            .windows(2)
            .rposition(|w| !w[0] && !w[1])
            .map_or(0, |i| i + 2);
        // The median needs three tries of polling: the first came after up to 130 epochs
        // (the wait had grown), each of the next two within 10.
        assert!(
            settled <= 130 + 2 * 10 + 2,
            "sleeps for two epochs in a row at {settled}: {modes:?}"
        );
        // Then it sleeps for the epoch that judges the deciding try, and for single tries.
        assert!(
            modes[settled..].iter().filter(|m| !**m).count() <= 4,
            "{modes:?}"
        );
        // And back: the first try of sleeping comes within 10 epochs, the verdict after three.
        let modes = run_epochs(&mut p, 60, paced);
        let settled = modes
            .windows(2)
            .rposition(|w| w[0] && w[1])
            .map_or(0, |i| i + 2);
        assert!(
            settled <= 3 * 10 + 2,
            "polls for two epochs in a row at {settled}: {modes:?}"
        );
    }

    #[test]
    fn one_lucky_try_does_not_change_the_choice() {
        // A paced driver; the third try of polling catches it catching up (twice the requests),
        // which alone would make polling win.
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 200, |index, polling| {
            if index == 31 {
                (4000, Duration::from_millis(20))
            } else {
                paced(index, polling)
            }
        });
        assert!(modes[31], "epoch 31 is the third try: {modes:?}");
        assert!(
            (3..modes.len() - 1).all(|i| !(modes[i] && modes[i + 1])),
            "polls for two epochs in a row: {modes:?}"
        );
    }

    #[test]
    fn a_try_is_judged_against_the_epochs_around_it_while_the_host_drifts() {
        // Closed loop where polling serves 1.3x (at 1.5x the CPU per request) while the host's
        // speed swings between 100% and 40% and back every 60 epochs: tries compared with
        // epochs seconds older would measure the swing.
        let speed = |index: usize| {
            let phase = (index % 60) as f64 / 30.0;
            1.0 - 0.6 * if phase <= 1.0 { phase } else { 2.0 - phase }
        };
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 1000, |index, polling| {
            let served = speed(index) * if polling { 2600.0 } else { 2000.0 };
            let cpu = served * if polling { 7.5 } else { 5.0 };
            (served as u64, Duration::from_micros(cpu as u64))
        });
        let polled = modes.iter().filter(|m| **m).count();
        assert!(polled >= 970, "polled {polled} of 1000 epochs: {modes:?}");
    }

    #[test]
    fn a_try_of_polling_starts_with_the_widest_window() {
        let mut p = PollPolicy::new(us(200));
        run_epochs(&mut p, 3, paced);
        assert!(!p.polling(), "sleeps under a paced load");
        // Long spells while sleeping would have collapsed the window; they are not counted.
        for _ in 0..10 {
            p.after_idle(us(5000));
        }
        let modes = run_epochs(&mut p, 8, paced);
        assert!(
            modes.iter().all(|m| !*m) && p.polling(),
            "tries polling after 8 sleeping epochs: {modes:?}"
        );
        assert_eq!(p.window(), us(200));
    }

    #[test]
    fn quiet_epochs_change_nothing_and_zero_max_never_polls() {
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 10, |_, _| {
            (MIN_REQUESTS - 1, Duration::from_millis(1))
        });
        assert!(modes.iter().all(|m| *m), "{modes:?}");
        let mut off = PollPolicy::new(Duration::ZERO);
        assert!(
            run_epochs(&mut off, 10, |_, _| (1000, Duration::from_millis(1)))
                .iter()
                .all(|m| !*m)
        );
        assert_eq!(off.window(), Duration::ZERO);
    }

    /// Drives a policy round by round (a round every 100 µs) for `span`; in each mode the
    /// driver gets `load(polling)`: requests per second and the thread's CPU in cores. Returns
    /// the time spent polling and the epochs that ended.
    fn run_rounds(
        p: &mut PollPolicy,
        span: Duration,
        load: impl Fn(bool) -> (f64, f64),
    ) -> (Duration, Vec<Epoch>) {
        let round = us(100);
        let start = Instant::now();
        p.advance(start, 0, || Duration::ZERO);
        let (mut requests, mut cpu, mut polled, mut epochs) =
            (0.0, 0.0, Duration::ZERO, Vec::new());
        let mut now = start;
        while now < start + span {
            let polling = p.polling();
            let (rate, cores) = load(polling);
            requests += rate * round.as_secs_f64();
            cpu += cores * round.as_secs_f64();
            now += round;
            if polling {
                polled += round;
            }
            epochs.extend(p.advance(now, requests as u64, || Duration::from_secs_f64(cpu)));
        }
        (polled, epochs)
    }

    #[test]
    fn a_slow_try_of_sleeping_lasts_until_it_has_served_enough_to_judge() {
        // Closed loop at iodepth 1 on a medium where a sleeping thread serves 6k requests per
        // second (30 in a 5 ms try, fewer than MIN_REQUESTS) and a polling one 40k.
        let mut p = PollPolicy::new(us(200));
        let (polled, epochs) = run_rounds(&mut p, Duration::from_secs(10), |polling| {
            if polling {
                (40_000.0, 1.0)
            } else {
                (6_000.0, 0.4)
            }
        });
        assert!(
            polled >= Duration::from_secs(9),
            "polled {polled:?} of 10 s: {epochs:?}"
        );
        let tries: Vec<&Epoch> = epochs.iter().filter(|e| !e.polling).collect();
        assert!(
            tries.len() >= 3,
            "measures sleeping now and then: {epochs:?}"
        );
        // Each try lasted until it had MIN_REQUESTS, about 42.7 ms: 5 ms gives no verdict.
        assert!(
            tries
                .iter()
                .all(|e| e.length >= Duration::from_millis(42)
                    && e.length <= Duration::from_millis(44)),
            "{tries:?}"
        );
    }

    #[test]
    fn a_try_on_a_queue_gone_quiet_ends_after_a_while_in_the_preferred_mode() {
        let mut p = PollPolicy::new(us(200));
        let start = Instant::now();
        p.advance(start, 0, || Duration::ZERO);
        // A busy first epoch polling; sleeping is tried next.
        let ended = p.advance(start + EPOCH, 1000, || Duration::from_millis(25));
        assert_eq!(
            ended,
            Some(Epoch {
                polling: true,
                length: EPOCH
            })
        );
        assert!(!p.polling());
        // Then the driver stops: the try waits for requests, and gives up after QUIET.
        let at = |ms| start + EPOCH + Duration::from_millis(ms);
        assert_eq!(p.advance(at(50), 1010, || Duration::from_millis(26)), None);
        let ended = p.advance(at(250), 1010, || Duration::from_millis(26));
        assert_eq!(
            ended,
            Some(Epoch {
                polling: false,
                length: QUIET
            })
        );
        assert!(p.polling(), "back to polling, the preferred mode");
        assert_eq!(p.window(), us(200), "with the window open");
        assert_eq!(
            (p.tried, p.tries),
            (None, 0),
            "a quiet try measured nothing"
        );
    }

    #[test]
    fn work_inside_the_window_keeps_it() {
        let mut w = PollWindow::new(us(50));
        for _ in 0..4 {
            w.after_idle(us(40));
        }
        assert_eq!(w.window(), us(32));
        w.after_idle(us(20));
        assert_eq!(w.window(), us(32));
    }
}
