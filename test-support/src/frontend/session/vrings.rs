//! The vrings: each queue's driver side and its kick, call and error eventfds; submitting
//! chains and waiting for what the backend returns and signals.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use vhost::VhostBackend;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{PendingReply, Session, SessionError};
use crate::frontend::memory::GuestMemory;
use crate::frontend::virtqueue::{Seg, SplitQueue, UsedElem};

/// A vring as the frontend sees it: the driver-side queue and its three eventfds.
pub struct Vring {
    pub queue: SplitQueue,
    /// Frontend writes to tell the backend there is work.
    pub kick: EventFd,
    /// Backend writes when it has put entries in the used ring.
    pub call: EventFd,
    /// Backend writes on a vring error.
    pub err: EventFd,
    /// Used elements popped while waiting for a different head.
    stash: VecDeque<UsedElem>,
}

impl Vring {
    pub(super) fn new(queue: SplitQueue) -> Result<Self, SessionError> {
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(SessionError::EventFd);
        Ok(Self {
            queue,
            kick: efd()?,
            call: efd()?,
            err: efd()?,
            stash: VecDeque::new(),
        })
    }
}

impl Session {
    /// Vring `q`.
    pub fn vring(&self, q: usize) -> Result<&Vring, SessionError> {
        self.vrings.get(q).ok_or(SessionError::NoQueue(q))
    }

    /// Vring `q`, mutable, with guest memory alongside (to build chains).
    pub fn vring_mut(&mut self, q: usize) -> Result<(&mut Vring, &GuestMemory), SessionError> {
        let vr = self.vrings.get_mut(q).ok_or(SessionError::NoQueue(q))?;
        Ok((vr, &self.mem))
    }

    /// Signals the kick eventfd of queue `q`.
    pub fn kick(&self, q: usize) -> Result<(), SessionError> {
        self.vring(q)?.kick.write(1).map_err(SessionError::EventFd)
    }

    /// Writes `segs` as a chain on queue `q`, publishes it and kicks. Returns the head.
    pub fn submit(&mut self, q: usize, segs: &[Seg]) -> Result<u16, SessionError> {
        let (vr, mem) = self.vring_mut(q)?;
        let head = vr.queue.add_chain(mem, segs)?;
        vr.queue.publish(mem, head)?;
        self.kick(q)?;
        Ok(head)
    }

    /// Publishes an already written head on queue `q` and kicks.
    pub fn publish(&mut self, q: usize, head: u16) -> Result<(), SessionError> {
        let (vr, mem) = self.vring_mut(q)?;
        vr.queue.publish(mem, head)?;
        self.kick(q)
    }

    /// Waits for the next used element on queue `q`.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<UsedElem, SessionError> {
        let start = Instant::now();
        loop {
            let (vr, mem) = self.vring_mut(q)?;
            if let Some(e) = vr.stash.pop_front() {
                return Ok(e);
            }
            if let Some(e) = vr.queue.pop_used(mem)? {
                return Ok(e);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(SessionError::Timeout { queue: q, waited });
            }
            wait_readable(&vr.call, (timeout - waited).min(Duration::from_millis(50)))?;
        }
    }

    /// Waits until head `head` comes back on queue `q`; other completions are kept for later.
    pub fn wait_head(
        &mut self,
        q: usize,
        head: u16,
        timeout: Duration,
    ) -> Result<UsedElem, SessionError> {
        let start = Instant::now();
        let (vr, _) = self.vring_mut(q)?;
        if let Some(pos) = vr.stash.iter().position(|e| e.id == u32::from(head)) {
            return Ok(vr.stash.remove(pos).unwrap_or(UsedElem { id: 0, len: 0 }));
        }
        loop {
            let (vr, mem) = self.vring_mut(q)?;
            while let Some(e) = vr.queue.pop_used(mem)? {
                if e.id == u32::from(head) {
                    return Ok(e);
                }
                vr.stash.push_back(e);
            }
            let waited = start.elapsed();
            if waited >= timeout {
                return Err(SessionError::HeadTimeout {
                    queue: q,
                    head,
                    waited,
                });
            }
            wait_readable(&vr.call, (timeout - waited).min(Duration::from_millis(50)))?;
        }
    }

    /// Returns whatever completes on queue `q` within `wait` (possibly nothing).
    pub fn drain_used(&mut self, q: usize, wait: Duration) -> Result<Vec<UsedElem>, SessionError> {
        let start = Instant::now();
        let mut out = Vec::new();
        loop {
            let (vr, mem) = self.vring_mut(q)?;
            out.extend(vr.stash.drain(..));
            while let Some(e) = vr.queue.pop_used(mem)? {
                out.push(e);
            }
            let waited = start.elapsed();
            if waited >= wait {
                return Ok(out);
            }
            wait_readable(&vr.call, (wait - waited).min(Duration::from_millis(20)))?;
        }
    }

    /// Whether the call eventfd of queue `q` was signalled since the last check (and clears it).
    pub fn take_call(&self, q: usize) -> Result<bool, SessionError> {
        Ok(self.call_count(q)? > 0)
    }

    /// How many times the backend signalled queue `q`'s call eventfd since it was last read
    /// (the counter sums the writes); clears it.
    pub fn call_count(&self, q: usize) -> Result<u64, SessionError> {
        match self.vring(q)?.call.read() {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(SessionError::EventFd(e)),
        }
    }

    /// Waits up to `timeout` for the backend to signal queue `q`'s call eventfd; clears it.
    /// Use before popping the used ring to check that a completion was notified.
    pub fn wait_call(&self, q: usize, timeout: Duration) -> Result<bool, SessionError> {
        let vr = self.vring(q)?;
        poll_readable(&vr.call, timeout)?;
        self.take_call(q)
    }

    /// GET_VRING_BASE for queue `q`, sent in the background; the reply is the ring's next
    /// avail index.
    pub fn get_vring_base_in_background(
        &mut self,
        q: usize,
    ) -> Result<PendingReply<u32>, SessionError> {
        self.vring(q)?;
        self.send_in_background(&format!("GET_VRING_BASE {q}"), false, move |f| {
            f.get_vring_base(q)
        })
    }
}

/// Waits until `efd` is readable or `timeout` passes, then empties it.
fn wait_readable(efd: &EventFd, timeout: Duration) -> Result<(), SessionError> {
    poll_readable(efd, timeout)?;
    let _ = efd.read();
    Ok(())
}

/// Waits until `efd` is readable or `timeout` passes.
fn poll_readable(efd: &EventFd, timeout: Duration) -> Result<(), SessionError> {
    let ts = Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    // SAFETY: `efd` is borrowed for the whole call, so its descriptor stays open while polled.
    let fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
    let mut fds = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    match rustix::event::poll(&mut fds, Some(&ts)) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(SessionError::EventFd(e.into())),
    }
    Ok(())
}
