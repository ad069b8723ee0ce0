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
        PollWindow { max, current: Duration::ZERO }
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
            if half < START { Duration::ZERO } else { half }
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
/// request would. So the queue thread runs in epochs: mostly in the mode that did better, now
/// and then one epoch in the other, and it compares the two modes by their epochs (each mode's
/// average, the newest epoch weighing half: one epoch the host slowed down should not decide). The
/// other mode is tried again after [`EXPLORE_FIRST`] epochs, and each time the try confirms the
/// choice the wait doubles, up to [`EXPLORE_LAST`] epochs (3.2 s): exploring costs what the
/// worse mode costs, 1/32 of the time would add 5% to a paced driver's CPU per request. For
/// the same reason a try lasts 5 ms, not 25. When the preference changes, the wait starts over.
///
/// ```text
///  polling served ≥ 10% more requests per second        poll
///  polling cost ≥ 10% less thread CPU per request        poll
///  otherwise                                           sleep
/// ```
///
/// Thread CPU time (CLOCK_THREAD_CPUTIME_ID, one system call per epoch) counts everything the
/// thread spent: spins, wake-ups, the work. An epoch lasts at least until it has served
/// [`MIN_REQUESTS`] requests; one that has not after [`QUIET`] (an idle queue, where the window
/// collapses by itself) tells nothing, and the thread goes back to the preferred mode.
#[derive(Debug)]
pub struct PollPolicy {
    window: PollWindow,
    polling: bool,
    /// Epochs left before the other mode is tried, and the wait after that.
    until_explore: u32,
    explore_every: u32,
    preferred: bool,
    /// Whether the queue thread has ticked yet.
    started: bool,
    epoch_start: Instant,
    cpu_start: Duration,
    requests_start: u64,
    /// What each mode served and cost, [sleeping, polling]: its epochs averaged, each new one
    /// weighing half.
    last: [Option<EpochCost>; 2],
}

/// Length of an epoch in the preferred mode, and of one that tries the other (short: it costs
/// what the worse mode costs). Either goes on until [`MIN_REQUESTS`] have been served.
const EPOCH: Duration = Duration::from_millis(25);
const TRY_EPOCH: Duration = Duration::from_millis(5);
/// Epochs in the preferred mode before the other is tried, at first and at most.
const EXPLORE_FIRST: u32 = 8;
const EXPLORE_LAST: u32 = 128;
/// An epoch goes on until it has served this many requests, to be judged by them (with 64, a
/// 5 ms try under a paced load of 20k per second caught the driver's catch-up bursts and
/// stalls: sleeping measured 11-17k, and a "faster" polling won on noise)...
const MIN_REQUESTS: u64 = 256;
/// ...or until it has lasted this long: fewer than about 1000 requests per second is a quiet
/// queue, whose epoch gives no verdict (the window collapses there by itself).
const QUIET: Duration = Duration::from_millis(250);
/// Polling must serve this much more to be kept at a higher CPU cost...
const THROUGHPUT_GAIN: f64 = 1.10;
/// ...or cost this much less CPU per request: where neither mode clearly wins, the thread
/// sleeps and leaves the CPU to the VM's other threads. (With "polling costs no more" a
/// paced driver, whose two modes cost about the same while the window is collapsed, had the
/// thread poll for 30-40% of its epochs on a coin toss of the measurement noise.)
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

/// Whether to prefer polling, given the last epoch of each mode.
pub fn prefer_polling(sleeping: EpochCost, polling: EpochCost) -> bool {
    polling.rate >= sleeping.rate * THROUGHPUT_GAIN || polling.cpu_per_request <= sleeping.cpu_per_request * CPU_SAVING
}

impl PollPolicy {
    /// `max` zero disables polling.
    pub fn new(max: Duration) -> PollPolicy {
        PollPolicy {
            window: PollWindow::new(max),
            polling: true,
            until_explore: EXPLORE_FIRST,
            explore_every: EXPLORE_FIRST,
            preferred: true,
            started: false,
            // Set on the queue thread's first tick (`started`).
            epoch_start: Instant::now(),
            cpu_start: Duration::ZERO,
            requests_start: 0,
            last: [None, None],
        }
    }

    /// Whether polling is on at all (`--poll-max-us` not zero).
    fn enabled(&self) -> bool {
        !self.window.max.is_zero()
    }

    /// How long to poll before sleeping now: zero in a sleeping epoch.
    pub fn window(&self) -> Duration {
        if self.polling { self.window.window() } else { Duration::ZERO }
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
    fn advance(&mut self, now: Instant, requests: u64, cpu: impl FnOnce() -> Duration) -> Option<Epoch> {
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
        let length = if self.polling == self.preferred { EPOCH } else { TRY_EPOCH };
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
        let ended = Epoch { polling: self.polling, length: now.duration_since(self.epoch_start) };
        let polling = if served >= MIN_REQUESTS {
            let cost = EpochCost {
                rate: served as f64 / ended.length.as_secs_f64(),
                cpu_per_request: cpu.saturating_sub(self.cpu_start).as_nanos() as f64 / served as f64,
            };
            let last = &mut self.last[usize::from(self.polling)];
            *last = Some(match *last {
                // Averaged with the earlier epochs of the mode: the machine's speed drifts
                // between epochs, and one slow epoch should not decide.
                Some(before) => EpochCost {
                    rate: (before.rate + cost.rate) / 2.0,
                    cpu_per_request: (before.cpu_per_request + cost.cpu_per_request) / 2.0,
                },
                None => cost,
            });
            self.next_mode()
        } else {
            // A quiet queue tells nothing about either mode: back to the preferred one (a try
            // is abandoned and comes again after the same wait).
            if self.polling != self.preferred {
                self.until_explore = self.explore_every;
            }
            self.preferred
        };
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

    /// The mode of the next epoch: the preferred one, or the other to measure it again.
    fn next_mode(&mut self) -> bool {
        let preferred = match self.last {
            [Some(sleeping), Some(polling)] => prefer_polling(sleeping, polling),
            // Not measured yet: try it next.
            [None, _] => return false,
            [_, None] => return true,
        };
        if preferred != self.preferred {
            self.preferred = preferred;
            self.explore_every = EXPLORE_FIRST;
            self.until_explore = EXPLORE_FIRST;
        } else if self.polling != preferred {
            // The try just measured confirmed the choice: wait longer before the next one.
            self.explore_every = (self.explore_every * 2).min(EXPLORE_LAST);
            self.until_explore = self.explore_every;
        }
        if self.until_explore == 0 {
            return !preferred;
        }
        self.until_explore -= 1;
        preferred
    }

    /// Whether this epoch polls.
    #[cfg(test)]
    pub fn polling(&self) -> bool {
        self.enabled() && self.polling
    }
}

/// CPU time the calling thread has used.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
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
        assert_eq!(seen, [us(25), us(12) + Duration::from_nanos(500), Duration::from_nanos(6250), Duration::ZERO, Duration::ZERO, Duration::ZERO]);
        // Back to short spells: it grows again from the start.
        w.after_idle(us(30));
        assert_eq!(w.window(), us(4));
    }

    fn cost(rate: f64, cpu_per_request: f64) -> EpochCost {
        EpochCost { rate, cpu_per_request }
    }

    #[test]
    fn polling_is_kept_when_it_buys_throughput_even_at_a_higher_cpu_cost() {
        // A closed-loop driver at iodepth 1: 31k requests/s polling against 4.7k sleeping.
        assert!(prefer_polling(cost(4_700.0, 20_000.0), cost(31_000.0, 30_000.0)));
        // 10% more is enough, 5% is not when it costs more.
        assert!(prefer_polling(cost(100_000.0, 1_000.0), cost(111_000.0, 1_500.0)));
        assert!(!prefer_polling(cost(100_000.0, 1_000.0), cost(105_000.0, 1_500.0)));
    }

    #[test]
    fn at_equal_throughput_polling_must_be_clearly_cheaper() {
        // A paced driver: the same rate either way.
        assert!(!prefer_polling(cost(20_000.0, 30_000.0), cost(20_000.0, 50_000.0)));
        assert!(prefer_polling(cost(20_000.0, 30_000.0), cost(20_000.0, 25_000.0)));
        // Neither clearly cheaper: sleep.
        assert!(!prefer_polling(cost(20_000.0, 30_000.0), cost(20_000.0, 30_000.0)));
        assert!(!prefer_polling(cost(20_000.0, 30_000.0), cost(20_000.0, 28_000.0)));
    }

    /// Drives a policy through `epochs` epochs; `epoch(polling)` says how many requests an
    /// epoch in that mode serves and how much CPU it uses. Returns each epoch's mode.
    fn run_epochs(p: &mut PollPolicy, epochs: usize, epoch: impl Fn(bool) -> (u64, Duration)) -> Vec<bool> {
        let mut modes = Vec::new();
        let (mut now, mut requests, mut cpu) = (p.epoch_start, p.requests_start, p.cpu_start);
        for _ in 0..epochs {
            let polling = p.polling();
            modes.push(polling);
            let (served, used) = epoch(polling);
            now += EPOCH;
            requests += served;
            cpu += used;
            p.end_epoch(now, requests, cpu);
        }
        modes
    }

    #[test]
    fn a_paced_driver_gets_a_sleeping_thread_that_still_tries_polling_now_and_then() {
        // The same 2000 requests per epoch either way; polling spins through the gaps.
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 300, |polling| {
            (2000, Duration::from_millis(if polling { 20 } else { 8 }))
        });
        assert!(modes[0] && !modes[1], "measures polling, then sleeping: {modes:?}");
        // Tries polling again after 8, 16, 32, 64 and 128 sleeping epochs.
        let tries: Vec<usize> = (2..modes.len()).filter(|&i| modes[i]).collect();
        assert_eq!(tries, [10, 27, 60, 125, 254], "{modes:?}");
    }

    #[test]
    fn a_driver_that_speeds_up_keeps_a_polling_thread() {
        // Closed loop at iodepth 1: polling serves 6x the requests at a higher CPU cost each.
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 200, |polling| {
            if polling { (3200, Duration::from_millis(25)) } else { (480, Duration::from_millis(2)) }
        });
        // Polling was the first guess and sleeping confirmed it: tries sleeping again after 16,
        // 32 and 64 polling epochs.
        let tries: Vec<usize> = (2..modes.len()).filter(|&i| !modes[i]).collect();
        assert_eq!(tries, [18, 51, 116], "{modes:?}");
    }

    #[test]
    fn when_the_load_changes_the_policy_follows_at_the_next_try() {
        // Paced first (sleeping wins), then the driver runs closed loop (polling wins).
        let mut p = PollPolicy::new(us(200));
        let paced = |polling: bool| (2000, Duration::from_millis(if polling { 20 } else { 8 }));
        run_epochs(&mut p, 60, paced);
        assert!(!p.polling() || p.until_explore == 0, "sleeps under a paced load");
        let closed = |polling: bool| if polling { (3200, Duration::from_millis(25)) } else { (480, Duration::from_millis(2)) };
        let modes = run_epochs(&mut p, 70, closed);
        let first_poll = modes.iter().position(|m| *m).expect("tries polling again");
        // From then on it polls, sleeping only for single epochs that measure sleeping again.
        let later = &modes[first_poll..];
        assert!(later.windows(2).all(|w| w[0] || w[1]), "sleeps for more than one epoch: {modes:?}");
        assert!(later.iter().filter(|m| **m).count() >= later.len() - 3, "{modes:?}");
    }

    #[test]
    fn a_try_of_polling_starts_with_the_widest_window() {
        let mut p = PollPolicy::new(us(200));
        let paced = |polling: bool| (2000, Duration::from_millis(if polling { 20 } else { 8 }));
        run_epochs(&mut p, 2, paced);
        assert!(!p.polling(), "sleeps under a paced load");
        // Long spells while sleeping would have collapsed the window; they are not counted.
        for _ in 0..10 {
            p.after_idle(us(5000));
        }
        let modes = run_epochs(&mut p, 8, paced);
        assert!(modes.iter().all(|m| !*m) && p.polling(), "tries polling after 8 sleeping epochs: {modes:?}");
        assert_eq!(p.window(), us(200));
    }

    #[test]
    fn quiet_epochs_change_nothing_and_zero_max_never_polls() {
        let mut p = PollPolicy::new(us(200));
        let modes = run_epochs(&mut p, 10, |_| (MIN_REQUESTS - 1, Duration::from_millis(1)));
        assert!(modes.iter().all(|m| *m), "{modes:?}");
        let mut off = PollPolicy::new(Duration::ZERO);
        assert!(run_epochs(&mut off, 10, |_| (1000, Duration::from_millis(1))).iter().all(|m| !*m));
        assert_eq!(off.window(), Duration::ZERO);
    }

    /// Drives a policy round by round (a round every 100 µs) for `span`; in each mode the
    /// driver gets `load(polling)`: requests per second and the thread's CPU in cores. Returns
    /// the time spent polling and the epochs that ended.
    fn run_rounds(p: &mut PollPolicy, span: Duration, load: impl Fn(bool) -> (f64, f64)) -> (Duration, Vec<Epoch>) {
        let round = us(100);
        let start = Instant::now();
        p.advance(start, 0, || Duration::ZERO);
        let (mut requests, mut cpu, mut polled, mut epochs) = (0.0, 0.0, Duration::ZERO, Vec::new());
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
            if polling { (40_000.0, 1.0) } else { (6_000.0, 0.4) }
        });
        assert!(polled >= Duration::from_secs(9), "polled {polled:?} of 10 s: {epochs:?}");
        let tries: Vec<&Epoch> = epochs.iter().filter(|e| !e.polling).collect();
        assert!(tries.len() >= 3, "measures sleeping now and then: {epochs:?}");
        // Each try lasted until it had MIN_REQUESTS, about 42.7 ms: 5 ms gives no verdict.
        assert!(tries.iter().all(|e| e.length >= Duration::from_millis(42) && e.length <= Duration::from_millis(44)), "{tries:?}");
    }

    #[test]
    fn a_try_on_a_queue_gone_quiet_ends_after_a_while_in_the_preferred_mode() {
        let mut p = PollPolicy::new(us(200));
        let start = Instant::now();
        p.advance(start, 0, || Duration::ZERO);
        // A busy first epoch polling; sleeping is tried next.
        let ended = p.advance(start + EPOCH, 1000, || Duration::from_millis(25));
        assert_eq!(ended, Some(Epoch { polling: true, length: EPOCH }));
        assert!(!p.polling());
        // Then the driver stops: the try waits for requests, and gives up after QUIET.
        let at = |ms| start + EPOCH + Duration::from_millis(ms);
        assert_eq!(p.advance(at(50), 1010, || Duration::from_millis(26)), None);
        let ended = p.advance(at(250), 1010, || Duration::from_millis(26));
        assert_eq!(ended, Some(Epoch { polling: false, length: QUIET }));
        assert!(p.polling(), "back to polling, the preferred mode");
        assert_eq!(p.window(), us(200), "with the window open");
        assert_eq!(p.last[0], None, "a quiet epoch measured nothing");
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
