//! The boundary between a queue loop and the I/O under it: an [`Engine`] takes operations on a
//! request's guest buffers, each with a tag, and hands back completions with those tags. The
//! queue loop does not know whether the bytes go to a file through io_uring, are copied from a
//! mapped image on the queue thread, or go nowhere (the null disk).
//!
//! ```text
//!  queue loop                         engine (one per queue thread)
//!  ──────────                         ─────────────────────────────
//!  submit(tag, operation, buffers) ─▶ done at once ─▶ Some(Completion)   (inline, null)
//!                                     or in flight ─▶ None; later:
//!  reap(events) ◀──────────────────── Event::Completed(Completion { tag, result, buffers })
//!  watch(fd, token) ────────────────▶ a one-shot read of the fd; later Event::Watch { token }
//!  enter(wait) ─────────────────────▶ submit what is queued; sleep until an event if `wait`
//! ```
//!
//! An engine owns each request's [`GuestBuffers`] from `submit` until it hands them back in the
//! completion, so it never leaves the kernel a pointer into memory that is no longer pinned.
//!
//! The queue loop's own wake-ups — the kick eventfd, the control eventfd — are watched by the
//! engine too ([`Engine::watch`]), so that one system call (for the file engine, one
//! `io_uring_enter`) submits a batch of I/O and sleeps until the next kick, control change or
//! completion, whichever comes first.
//!
//! An engine whose I/O completes on threads of its own (librbd's) may also return a finished
//! request to the driver from there, through the [`Publisher`] the queue loop gives it, while
//! the queue thread sleeps (virtio_blk/direct.rs): that saves waking the queue thread between
//! the completion and the driver. The completion still comes from `reap`, marked
//! `published`, so that the queue loop retires the request (statistics, dirty log, unpin).

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use crate::vhost_user::GuestBuffers;

/// Identifies a request between `submit` and its completion: the queue loop's slot index,
/// below the queue size the engine was made for.
pub type Tag = u16;

/// One discard or write-zeroes range, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub len: u64,
    /// Write-zeroes may deallocate the range (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
    pub unmap: bool,
}

/// What a request asks of the disk. Reads and writes move all of the request's buffers.
#[derive(Debug, Clone, Copy)]
pub enum Operation<'a> {
    Read {
        offset: u64,
    },
    Write {
        offset: u64,
        /// Durable when complete: the device's write cache is off (write-through).
        dsync: bool,
    },
    Flush,
    /// `dsync`: durable when complete, as for a write (write-through).
    Discard {
        segments: &'a [Segment],
        dsync: bool,
    },
    WriteZeroes {
        segments: &'a [Segment],
        dsync: bool,
    },
}

/// A finished request.
#[derive(Debug)]
pub struct Completion {
    pub tag: Tag,
    /// The first error of the request's operations, if any.
    pub result: io::Result<()>,
    /// Done on the queue thread itself, with no io_uring round trip (counted in the stats).
    pub inline: bool,
    /// Already returned to the driver by the engine's own thread ([`Publisher::publish`]):
    /// the queue loop only retires it.
    pub published: bool,
    /// The request's buffers, still pinned: the queue loop writes the status, returns the
    /// chain and then releases them.
    pub buffers: GuestBuffers,
}

impl Completion {
    pub fn new(tag: Tag, result: io::Result<()>, buffers: GuestBuffers) -> Completion {
        Completion {
            tag,
            result,
            inline: false,
            published: false,
            buffers,
        }
    }
}

/// What [`Engine::reap`] found.
#[derive(Debug)]
pub enum Event {
    Completed(Completion),
    /// A watched fd was read; `result` is what the read returned (negative errno when it
    /// failed or was cancelled by [`Engine::unwatch`]). The watch is disarmed.
    Watch {
        token: u32,
        result: i32,
    },
}

/// What [`Publisher::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publication {
    /// Not published (the queue thread is awake, or the request needs it): complete it the
    /// usual way, waking the queue thread.
    Refused,
    /// Returned to the driver; the queue thread retires it when it next wakes.
    Published,
    /// Returned to the driver, but the queue thread must wake up to retire it soon (the dirty
    /// log is on: its writes are to be marked).
    PublishedWake,
}

/// The queue loop's side of direct completion, handed to an engine that accepts it
/// ([`Engine::publish_with`]); callable from any thread.
pub trait Publisher: Send + Sync {
    /// Returns the successful request `tag` to the driver now, from the calling thread, if the
    /// queue thread sleeps and allows it. The engine must still report the completion from
    /// [`Engine::reap`], with `published` set unless this returned [`Publication::Refused`].
    fn publish(&self, tag: Tag) -> Publication;
}

/// A queue's I/O engine. Used by one thread at a time: made on the connection thread (so a
/// failure reaches the frontend), then moved to the queue thread, which calls
/// [`Engine::start`] before anything else.
///
/// Dropping an engine while the kernel may still write into what it holds (requests in flight,
/// armed watches) leaks that memory rather than freeing it under the kernel; a queue loop
/// drains it first.
pub trait Engine: Send {
    /// Makes the calling thread the engine's user (io_uring: its only submitter).
    fn start(&mut self) -> io::Result<()>;

    /// Starts `operation` on `buffers` for the request `tag`. `Some` when it is done already
    /// (or failed before anything was started); otherwise its completion comes from
    /// [`Engine::reap`]. `tag` must not be in flight.
    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        buffers: GuestBuffers,
    ) -> Option<Completion>;

    /// Asks the kernel to cancel the operations of every request in flight whose buffers
    /// `which` picks; they complete with ECANCELED (unless they finish first).
    fn cancel(&mut self, which: &dyn Fn(&GuestBuffers) -> bool) -> io::Result<()>;

    /// Arms a one-shot read of `len` bytes (1 to 8: an eventfd's counter, a FIFO's byte) from
    /// `fd`, reported as [`Event::Watch`] with `token`. The bytes are discarded. `fd` must stay
    /// open until the event is reaped.
    fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> io::Result<()>;

    /// Cancels the watch `token`; its event still comes (with -ECANCELED if it was pending).
    fn unwatch(&mut self, token: u32) -> io::Result<()>;

    /// Submits what is queued; with `wait`, sleeps until at least one event is ready.
    fn enter(&mut self, wait: bool) -> io::Result<()>;

    /// Submits what is queued and sleeps until an event is ready or `timeout` passes: `false`
    /// then.
    fn enter_timeout(&mut self, timeout: Duration) -> io::Result<bool>;

    /// Whether events are ready (or work that produces them is pending, which the next
    /// [`Engine::enter`] runs), without a system call: for polling.
    fn has_events(&mut self) -> bool;

    /// Appends the events that are ready to `events`.
    fn reap(&mut self, events: &mut Vec<Event>);

    /// Whether the queue thread may busy-poll the avail ring while it waits on this engine
    /// (adaptive polling, `--poll-max-us`). An engine whose I/O runs on threads of its own
    /// (librbd's) says no: those threads do the work, and a polling queue thread takes the CPU
    /// they need.
    fn may_poll(&self) -> bool {
        true
    }

    /// Offers the engine a way to return requests to the driver from its own threads
    /// (module doc). `true` if it will use it: the queue loop then lends its ring whenever it
    /// sleeps with kicks on. Called before [`Engine::start`].
    fn publish_with(&mut self, _publisher: Arc<dyn Publisher>) -> bool {
        false
    }
}
