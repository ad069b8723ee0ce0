//! The pin on one guest memory region: how many in-flight requests use it, and whether it is
//! being retired. Lock-free, so it is model-checked with loom
//! (`RUSTFLAGS="--cfg loom" cargo test -p vublk --lib pin`).
//!
//! The protocol, the kernel's `mmget_not_zero` against `mmput` turned into a handshake:
//! - a request: increment the count, then check the flag; if retiring, decrement and fail;
//! - the session: set the flag, then wait for the count to reach zero; then reply (after
//!   which the frontend may reuse the memory) and let the mapping go.
//!
//! A sequentially consistent fence on each side, between its write and its read, makes it
//! impossible for both reads to miss the other's write (Dekker): either the request sees the
//! flag, or the session sees the request's increment. The decrement releases what the request
//! did to guest memory; the session's load that sees it acquires it. So no request touches the
//! region after the session stopped waiting.
//!
//! A request's pins are held by its [`GuestBuffers`](super::GuestBuffers), which unpin when
//! dropped or released, so no code path can forget to unpin or unpin twice.

#[cfg(loom)]
use loom::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};
#[cfg(not(loom))]
use std::sync::atomic::{fence, AtomicBool, AtomicUsize, Ordering};

/// The in-flight requests using one region, and whether it is being retired.
#[derive(Debug)]
pub struct RegionPin {
    pub guest_phys_addr: u64,
    pub size: u64,
    in_flight: AtomicUsize,
    retiring: AtomicBool,
}

impl RegionPin {
    pub fn new(guest_phys_addr: u64, size: u64) -> RegionPin {
        RegionPin {
            guest_phys_addr,
            size,
            in_flight: AtomicUsize::new(0),
            retiring: AtomicBool::new(false),
        }
    }

    /// Pins the region for one request; `false` (and no pin) once it is retiring.
    pub(super) fn try_pin(&self) -> bool {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.retiring.load(Ordering::Relaxed) {
            self.in_flight.fetch_sub(1, Ordering::Release);
            return false;
        }
        true
    }

    /// Drops a pin taken by [`RegionPin::try_pin`], after the request's completion is written.
    pub(super) fn unpin(&self) {
        self.in_flight.fetch_sub(1, Ordering::Release);
    }

    /// Requests using the region. Zero after [`RegionPin::retire`] means zero for good.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Takes the region out of service: no pin taken after this returns succeeds, and
    /// [`RegionPin::in_flight`] sees every pin that did.
    pub fn retire(&self) {
        self.retiring.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::RegionPin;
    use loom::sync::atomic::{AtomicBool, Ordering};
    use loom::sync::Arc;

    /// A request racing with the region's retirement never touches it after the session
    /// finished waiting (when the mapping would go).
    #[test]
    fn no_access_after_retirement() {
        loom::model(|| {
            let pin = Arc::new(RegionPin::new(0, 4096));
            let unmapped = Arc::new(AtomicBool::new(false));
            let request = {
                let (pin, unmapped) = (pin.clone(), unmapped.clone());
                loom::thread::spawn(move || {
                    if pin.try_pin() {
                        assert!(
                            !unmapped.load(Ordering::SeqCst),
                            "request used a retired region"
                        );
                        pin.unpin();
                    }
                })
            };
            pin.retire();
            while pin.in_flight() > 0 {
                loom::thread::yield_now();
            }
            unmapped.store(true, Ordering::SeqCst);
            request.join().unwrap();
        });
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::RegionPin;

    #[test]
    fn pins_fail_once_retiring_and_counts_balance() {
        let pin = RegionPin::new(0, 4096);
        assert!(pin.try_pin());
        assert!(pin.try_pin());
        assert_eq!(pin.in_flight(), 2);
        pin.retire();
        assert!(!pin.try_pin(), "a retiring region takes no new pins");
        assert_eq!(pin.in_flight(), 2, "a failed try leaves no pin behind");
        pin.unpin();
        pin.unpin();
        assert_eq!(pin.in_flight(), 0);
    }
}
