//! Direct completion: an engine whose I/O completes on threads of its own (librbd's) returns a
//! finished request to the driver from there while the queue thread sleeps, instead of waking
//! the queue thread to do it. On the two-core dev machine that wakeup took 33 µs on average, at
//! iodepth 1 on an RBD image, out of about 220 µs per request (docs/benchmarks.md).
//!
//! ```text
//!  queue thread                                 engine's thread (its completion callback)
//!  ────────────                                 ─────────────────────────────────────────
//!  awake: holds the ring
//!  submit: notes head, used length, status byte
//!  idle, kicks on: lends the ring, sleeps ────▶ publish(tag): status byte, inflight entry, used
//!                                               entry, a call if the driver wants one
//!  wakes (kick, control, completion): takes the ring back
//!  reap: Completed { published } ─▶ retire: statistics, dirty log, slot, unpin
//! ```
//!
//! The ring (the virtqueue and the inflight tracker) is a mutex the queue thread holds for as
//! long as it is awake, so the queue thread pays one lock per sleep; the engine's thread only
//! tries it, and leaves the request to the queue thread when it is held or not lent. The queue
//! thread lends it only when nothing but a kick or a control request can need the thread
//! before the next completion: kicks are on (a driver that makes a freed head available again
//! kicks), no chain waits for a free slot, and the export is not throttled. Engines that do not
//! publish never lend it: their queue thread takes the lock once, at start.
//!
//! Only successful requests are published (a failure is logged by the queue thread), and only
//! while the frontend is there. The dirty log is marked when the request retires, after its used
//! entry: while logging is on the publisher asks for that wakeup at once. A mark that comes after
//! one of the frontend's syncs is still in time for the next one; the last one comes after the
//! ring stops, and a stopping queue thread retires every request first.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::io::{Publication, Publisher, Tag};
use crate::vhost_user::{CallFd, DirtyLog, GuestMemoryHandle, QueueControl, StatusByte, Tracker};

use super::device::BlockDevice;
use super::spec;
use super::stats::QueueStats;

/// What the queue thread and a publishing engine's thread share: the virtqueue, and what
/// returning a request to the driver needs.
pub(super) struct Ring {
    pub queue: Queue,
    /// The ring's inflight region, when the frontend gave one.
    pub inflight: Option<Tracker>,
    /// The queue thread sleeps and lets the engine's thread publish.
    pub lent: bool,
    /// Per tag, what publishing the request takes: noted when it is submitted.
    pub requests: Box<[Publishable]>,
}

impl Ring {
    pub fn new(queue: Queue, inflight: Option<Tracker>) -> Ring {
        let size = usize::from(queue.size());
        Ring {
            queue,
            inflight,
            lent: false,
            requests: vec![Publishable::default(); size].into_boxed_slice(),
        }
    }

    /// Whether a finished request must stay out of the used ring: the frontend left and keeps
    /// an inflight region, from which the next backend runs the request again.
    pub fn abandoned(&self, control: &QueueControl) -> bool {
        self.inflight.is_some() && control.abandoned()
    }

    /// Returns `head` to the driver with `used_len` bytes written, recorded in the inflight
    /// region around the used entry; `queue` names the queue in an error. Returns the used index
    /// the entry went to.
    pub fn add_used(
        &mut self,
        memory: &GuestMemoryMmap,
        head: u16,
        used_len: u32,
        queue: usize,
    ) -> u16 {
        if let Some(tracker) = &mut self.inflight {
            tracker.completing(head);
        }
        let at = self.queue.next_used();
        if let Err(e) = self.queue.add_used(memory, head, used_len) {
            tracing::error!("queue {queue}: cannot return request {head} to the driver: {e}");
        }
        if let Some(tracker) = &mut self.inflight {
            tracker.completed(head, self.queue.next_used());
        }
        at
    }

    /// Signals `call` if the driver wants an interrupt for what was added to the used ring,
    /// and counts it in `stats`.
    pub fn notify(&mut self, memory: &GuestMemoryMmap, call: &CallFd, stats: Option<&QueueStats>) {
        match self.queue.needs_notification(memory) {
            Ok(false) => {}
            // When in doubt, interrupt: a spurious interrupt costs less than a hung guest.
            Ok(true) | Err(_) => {
                call.signal();
                if let Some(stats) = stats {
                    stats.record_call();
                }
            }
        }
    }
}

/// One request in flight, as publishing it needs it.
#[derive(Clone, Copy, Default)]
pub(super) struct Publishable {
    pub head: u16,
    pub used_len: u32,
    /// `None`: not to be published.
    pub status: Option<StatusByte>,
    /// Set when published: the used index its entry went to, and when.
    pub published: Option<(u16, Instant)>,
}

/// The [`Publisher`] of one queue, given to its engine.
pub(super) struct Direct {
    pub ring: Arc<Mutex<Ring>>,
    pub device: Arc<BlockDevice>,
    pub index: usize,
    pub memory: GuestMemoryHandle,
    pub call: Arc<CallFd>,
    pub control: Arc<QueueControl>,
    pub log: DirtyLog,
}

impl Publisher for Direct {
    fn publish(&self, tag: Tag) -> Publication {
        let Some(mut ring) = self.ring.try_lock() else {
            return Publication::Refused;
        };
        if !ring.lent {
            return Publication::Refused;
        }
        let Some(&request) = ring.requests.get(usize::from(tag)) else {
            return Publication::Refused;
        };
        let Some(status) = request.status else {
            return Publication::Refused;
        };
        if ring.abandoned(&self.control) {
            // The queue thread leaves it to the next backend (queue.rs, `release`).
            return Publication::Refused;
        }
        // SAFETY: the engine keeps the request's buffers pinned until the queue thread has
        // reaped its completion, which the engine reports only after this returns; the queue
        // thread writes no status of a request in flight, and sleeps meanwhile.
        unsafe { status.write(spec::VIRTIO_BLK_S_OK as u8) };
        let generation = self.memory.current();
        let memory = generation.memory();
        let at = ring.add_used(memory, request.head, request.used_len, self.index);
        ring.requests[usize::from(tag)].published = Some((at, Instant::now()));
        ring.notify(memory, &self.call, self.device.stats.get(self.index));
        // Checked after the writes, as on the queue thread (dirty_log.rs).
        if self.log.active() {
            Publication::PublishedWake
        } else {
            Publication::Published
        }
    }
}
