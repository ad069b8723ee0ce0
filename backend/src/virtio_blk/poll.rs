//! How long a queue thread busy-polls its avail ring before it sleeps: an adaptive window.
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

use std::time::Duration;

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
