//! The epoll behind the three event loops: the supervisor's, a worker's main thread and the
//! `--single-process` daemon's. One owned [`EventLoop`] (vmm-sys-util's `Epoll`, closed on
//! drop) reports what is ready as values of the loop's own [`Token`] enum, so a loop matches
//! on variants instead of decoding bit fields by hand.
//!
//! Every descriptor is watched level-triggered: what a loop leaves unread (a connection not
//! accepted yet, reports past a per-wake-up budget) wakes it again. Deadlines are the wait's
//! timeout; a signal that interrupts the wait is a wake-up with nothing ready, so the loop
//! looks at its state (and its deadlines) again.

pub mod clients;

use std::io;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// What an event loop watches, as the `u64` epoll hands back: each loop has an enum of these,
/// with a hand-written encoding (crosvm derives it with `#[derive(EventToken)]`).
pub trait Token: Copy {
    /// The value epoll carries for this token.
    fn to_raw(self) -> u64;
    /// The token [`to_raw`](Token::to_raw) made `raw` from; `None` for anything else.
    fn from_raw(raw: u64) -> Option<Self>;
}

/// Bits of a raw token that carry the variant's payload (an index, an id); the variant's
/// number is above them.
const PAYLOAD_BITS: u32 = 56;
const PAYLOAD_MASK: u64 = (1 << PAYLOAD_BITS) - 1;

/// The raw form of variant number `variant` with `payload`, for [`Token::to_raw`]. A payload
/// must fit in 56 bits (the ids here count up from 1, one per VM or export).
pub fn pack(variant: u8, payload: u64) -> u64 {
    debug_assert!(payload <= PAYLOAD_MASK, "token payload {payload} too large");
    (u64::from(variant) << PAYLOAD_BITS) | (payload & PAYLOAD_MASK)
}

/// The variant number and payload [`pack`] made `raw` from, for [`Token::from_raw`].
pub fn unpack(raw: u64) -> (u8, u64) {
    ((raw >> PAYLOAD_BITS) as u8, raw & PAYLOAD_MASK)
}

/// At most this many events are taken per wait; the rest stay ready for the next one.
const MAX_EVENTS: usize = 16;

/// An epoll instance whose events are tokens of type `T`.
pub struct EventLoop<T> {
    epoll: Epoll,
    tokens: PhantomData<T>,
}

impl<T: Token> EventLoop<T> {
    pub fn new() -> io::Result<EventLoop<T>> {
        Ok(EventLoop {
            epoll: Epoll::new()?,
            tokens: PhantomData,
        })
    }

    /// Reports `token` while `fd` is readable (or hung up).
    pub fn watch(&self, fd: &impl AsRawFd, token: T) -> io::Result<()> {
        self.add(fd, EventSet::IN, token)
    }

    /// Reports `token` while `fd` has room to write (or is hung up).
    pub fn watch_writable(&self, fd: &impl AsRawFd, token: T) -> io::Result<()> {
        self.add(fd, EventSet::OUT, token)
    }

    fn add(&self, fd: &impl AsRawFd, events: EventSet, token: T) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd.as_raw_fd(),
            EpollEvent::new(events, token.to_raw()),
        )
    }

    /// Stops watching `fd`. Not watching it (any more) is not an error: callers stop watching
    /// what may never have been watched, and a closed descriptor has left the set already.
    pub fn unwatch(&self, fd: &impl AsRawFd) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            fd.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Waits until something is ready or `timeout` (rounded up to a millisecond, so a deadline
    /// is not woken for early) has passed; `None` waits without a limit. An interrupted wait
    /// returns nothing ready.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Ready<T>> {
        let timeout = timeout.map_or(-1, |t| {
            t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i32
        });
        let mut ready = Ready {
            events: [EpollEvent::default(); MAX_EVENTS],
            len: 0,
            next: 0,
            tokens: PhantomData,
        };
        match self.epoll.wait(timeout, &mut ready.events) {
            Ok(n) => ready.len = n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        Ok(ready)
    }
}

/// What one wait found ready, in the order epoll gave it; raw values that are no token of
/// `T` are skipped. It owns its events, so the loop may change what it watches while going
/// through them.
pub struct Ready<T> {
    events: [EpollEvent; MAX_EVENTS],
    len: usize,
    next: usize,
    tokens: PhantomData<T>,
}

impl<T: Token> Iterator for Ready<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        while self.next < self.len {
            let raw = self.events[self.next].data();
            self.next += 1;
            if let Some(token) = T::from_raw(raw) {
                return Some(token);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Test {
        A,
        B(u64),
    }

    impl Token for Test {
        fn to_raw(self) -> u64 {
            match self {
                Test::A => pack(0, 0),
                Test::B(id) => pack(1, id),
            }
        }

        fn from_raw(raw: u64) -> Option<Test> {
            match unpack(raw) {
                (0, 0) => Some(Test::A),
                (1, id) => Some(Test::B(id)),
                _ => None,
            }
        }
    }

    #[test]
    fn tokens_round_trip() {
        for token in [Test::A, Test::B(0), Test::B(7), Test::B(PAYLOAD_MASK)] {
            assert_eq!(Test::from_raw(token.to_raw()), Some(token));
        }
        assert_eq!(Test::from_raw(pack(2, 0)), None);
        assert_eq!(Test::from_raw(pack(0, 1)), None);
    }

    #[test]
    fn level_triggered_readable_and_writable() {
        let events = EventLoop::<Test>::new().unwrap();
        let a = EventFd::new(EFD_NONBLOCK).unwrap();
        let (b, _peer) = UnixStream::pair().unwrap();
        events.watch(&a, Test::A).unwrap();
        events.watch_writable(&b, Test::B(3)).unwrap();
        assert_eq!(
            events
                .wait(Some(Duration::ZERO))
                .unwrap()
                .collect::<Vec<_>>(),
            [Test::B(3)]
        );
        a.write(1).unwrap();
        for _ in 0..2 {
            // Not read: still ready.
            let mut ready: Vec<_> = events.wait(None).unwrap().collect();
            ready.sort_by_key(|t| t.to_raw());
            assert_eq!(ready, [Test::A, Test::B(3)]);
        }
        events.unwatch(&b);
        events.unwatch(&b);
        assert_eq!(events.wait(None).unwrap().collect::<Vec<_>>(), [Test::A]);
    }

    #[test]
    fn the_timeout_is_not_cut_short() {
        let events = EventLoop::<Test>::new().unwrap();
        let start = Instant::now();
        let timeout = Duration::from_micros(2500);
        assert_eq!(events.wait(Some(timeout)).unwrap().count(), 0);
        assert!(start.elapsed() >= timeout);
    }
}
