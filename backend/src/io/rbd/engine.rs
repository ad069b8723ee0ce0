//! A queue's engine on an RBD image: each operation is one librbd aio call made straight from
//! the guest's iovecs, and its completion comes back to the queue thread through an eventfd its
//! io_uring watches, beside the kick and control eventfds, so one `io_uring_enter` still sleeps
//! until a kick, a control change or a completion.
//!
//! ```text
//!  queue thread                        librbd's threads
//!  ────────────                        ────────────────
//!  submit ─▶ rbd_aio_{readv,writev,flush,discard,write_zeroes}(…, completion(slot context)):
//!            librbd maps it to objects and queues it to the messenger, in this thread
//!            (`rbd_non_blocking_aio` off, image.rs)
//!                                      the cluster answers ─▶ on_complete(completion, context):
//!                                        result; rbd_aio_release; if the queue thread sleeps,
//!                                        return the request to the driver (publish); push
//!                                        (tag, result, published) on the queue's mailbox;
//!                                        wake the queue thread unless published
//!  io_uring read of the eventfd ◀──────┘
//!  reap ─▶ drain the mailbox ─▶ Completion per request whose operations are all back
//! ```
//!
//! Publishing from the callback (virtio_blk/direct.rs) saves the queue thread's wakeup between
//! librbd's answer and the driver's interrupt: one thread less on the way of every request
//! that completes while the queue thread sleeps. Only requests of a single librbd operation
//! are published (reads, writes, flushes, one-range discards and write-zeroes).
//!
//! The image is shared by all the device's queues (image.rs says why), so librbd's own per-image
//! event socket (`rbd_set_image_notification`, reaped with `rbd_poll_io_events`) would hand one
//! queue's completions to another queue's thread; the completion callback instead posts each
//! one to the mailbox of the queue that submitted it. The callback takes a lock the queue thread
//! holds only to swap a vector, and writes the eventfd once per batch.
//!
//! librbd cannot cancel an operation: [`Engine::cancel`] does nothing, and a request ends when
//! the cluster answers, or when librados gives up on it (`--ceph-timeout`).

use std::ffi::{c_int, c_void};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::disk::{Backing, Disk};
use crate::io::engine::{Completion, Engine, Event, Operation, Publication, Publisher, Tag};
use crate::io::file::ring_entries;
use crate::io::uring::{self, Reaped, Ring};
use crate::vhost_user::GuestBuffers;

use super::ffi::{self, CompletionT};
use super::image::RbdImage;

/// The watch token of the mailbox's eventfd; the queue loop's tokens are small numbers.
const MAILBOX: u32 = u32::MAX;

/// One finished librbd operation: its request, its result, and whether the request was
/// returned to the driver already.
#[derive(Clone, Copy)]
struct Mail {
    tag: Tag,
    result: isize,
    published: bool,
}

/// What the mailbox holds.
#[derive(Default)]
struct Contents {
    mail: Vec<Mail>,
    /// The eventfd was written since the queue thread last drained the box.
    signalled: bool,
}

/// Where librbd's threads leave a queue's completions.
struct Mailbox {
    done: Mutex<Contents>,
    eventfd: EventFd,
    /// The queue loop's direct completion, when it offered it.
    publisher: OnceLock<Arc<dyn Publisher>>,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, Contents> {
        // A panic while holding the lock left plain values: still usable.
        self.done.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Leaves `mail` for the queue thread, and wakes it unless the request was published
    /// quietly (or the eventfd is written already).
    fn post(&self, mail: Mail, publication: Publication) {
        let mut done = self.lock();
        done.mail.push(mail);
        let wake = publication != Publication::Published && !done.signalled;
        done.signalled |= wake;
        drop(done);
        if wake {
            // Only fails when the counter would overflow: it is read at every wakeup.
            let _ = self.eventfd.write(1);
        }
    }
}

/// What a completion callback is given: the mailbox and the request it is for. One per slot,
/// at a fixed address for the life of the engine.
struct Context {
    mailbox: Arc<Mailbox>,
    tag: Tag,
    /// The request is one librbd operation, so its completion may be published.
    single: AtomicBool,
}

/// Called by librbd on one of its threads when an operation completes.
unsafe extern "C" fn on_complete(completion: CompletionT, arg: *mut c_void) {
    // SAFETY: `arg` is a `Context` of the engine that started the operation; the engine keeps
    // its contexts while operations are in flight, and leaks them if dropped before (Drop).
    let context = unsafe { &*arg.cast::<Context>() };
    let result = match ffi::api() {
        Ok(api) => {
            // SAFETY: a completion librbd has finished with (it is calling us); it is released
            // once, here, and not used again.
            unsafe {
                let result = (api.rbd_aio_get_return_value)(completion);
                (api.rbd_aio_release)(completion);
                result
            }
        }
        // Not reachable: the operation was started through the loaded library.
        Err(_) => -(libc::EIO as isize),
    };
    let mailbox = &context.mailbox;
    let publication = match mailbox.publisher.get() {
        Some(publisher) if result >= 0 && context.single.load(Ordering::Acquire) => {
            publisher.publish(context.tag)
        }
        _ => Publication::Refused,
    };
    let mail = Mail {
        tag: context.tag,
        result,
        published: publication != Publication::Refused,
    };
    mailbox.post(mail, publication);
}

/// One request in flight.
struct Slot {
    /// Owned from submit until the completion hands them back.
    buffers: Option<GuestBuffers>,
    /// Operations started in librbd whose completions have not been reaped.
    pending: u32,
    /// The first error.
    errno: Option<i32>,
    /// Returned to the driver from librbd's thread (direct completion).
    published: bool,
}

pub struct RbdEngine {
    ring: Ring,
    image: Arc<RbdImage>,
    slots: Vec<Slot>,
    contexts: ManuallyDrop<Box<[Context]>>,
    mailbox: Arc<Mailbox>,
    /// The mailbox's contents, swapped out to be processed without its lock.
    taken: Vec<Mail>,
    cqes: Vec<uring::Completion>,
    /// Operations in librbd, all slots together.
    in_flight: usize,
}

impl RbdEngine {
    /// An engine on `disk` (an RBD image) for up to `depth` requests at once.
    pub fn new(disk: &Disk, depth: u16) -> io::Result<RbdEngine> {
        let Backing::Rbd(image) = &disk.backing else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the RBD engine needs an RBD image",
            ));
        };
        let mailbox = Arc::new(Mailbox {
            done: Mutex::new(Contents {
                mail: Vec::with_capacity(usize::from(depth)),
                signalled: false,
            }),
            eventfd: EventFd::new(EFD_NONBLOCK)?,
            publisher: OnceLock::new(),
        });
        Ok(RbdEngine {
            ring: Ring::new(ring_entries(depth), None)?,
            image: image.clone(),
            slots: (0..depth)
                .map(|_| Slot {
                    buffers: None,
                    pending: 0,
                    errno: None,
                    published: false,
                })
                .collect(),
            contexts: ManuallyDrop::new(
                (0..depth)
                    .map(|tag| Context {
                        mailbox: mailbox.clone(),
                        tag,
                        single: AtomicBool::new(false),
                    })
                    .collect(),
            ),
            mailbox,
            taken: Vec::with_capacity(usize::from(depth)),
            cqes: Vec::with_capacity(usize::from(depth) + 2),
            in_flight: 0,
        })
    }

    /// Starts one librbd operation of the request `tag`: `call` gets the completion and returns
    /// what the aio function did. `false` (and the error noted) if it was not started.
    fn start(&mut self, tag: Tag, call: impl FnOnce(CompletionT) -> c_int) -> bool {
        let api = self.image.api();
        let index = usize::from(tag);
        let arg = std::ptr::from_ref(&self.contexts[index])
            .cast_mut()
            .cast::<c_void>();
        let mut completion: CompletionT = std::ptr::null_mut();
        // SAFETY: `arg` is this slot's context, which outlives the completion (see Drop);
        // `completion` is written on success.
        let ret = unsafe { (api.rbd_aio_create_completion)(arg, on_complete, &mut completion) };
        let ret = if ret < 0 { ret } else { call(completion) };
        let slot = &mut self.slots[index];
        if ret < 0 {
            if !completion.is_null() {
                // SAFETY: librbd refused the operation, so it will not call back with it.
                unsafe { (api.rbd_aio_release)(completion) };
            }
            slot.errno.get_or_insert(-ret);
            return false;
        }
        slot.pending += 1;
        self.in_flight += 1;
        true
    }

    /// Takes the finished request out of its slot.
    fn done(&mut self, tag: Tag) -> Option<Completion> {
        let slot = &mut self.slots[usize::from(tag)];
        let buffers = slot.buffers.take()?;
        let result = match slot.errno.take() {
            None => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        };
        let mut completion = Completion::new(tag, result, buffers);
        completion.published = std::mem::take(&mut slot.published);
        Some(completion)
    }

    fn mail_waiting(&self) -> bool {
        !self.mailbox.lock().mail.is_empty()
    }

    /// Turns what the mailbox holds into completions.
    fn drain(&mut self, events: &mut Vec<Event>) {
        let mut taken = std::mem::take(&mut self.taken);
        {
            let mut done = self.mailbox.lock();
            std::mem::swap(&mut taken, &mut done.mail);
            done.signalled = false;
        }
        for &Mail {
            tag,
            result,
            published,
        } in &taken
        {
            let Some(slot) = self.slots.get_mut(usize::from(tag)) else {
                continue;
            };
            slot.pending = slot.pending.saturating_sub(1);
            slot.published |= published;
            self.in_flight = self.in_flight.saturating_sub(1);
            if result < 0 {
                slot.errno
                    .get_or_insert(i32::try_from(-result).unwrap_or(libc::EIO));
            }
            if slot.pending == 0 {
                if let Some(completion) = self.done(tag) {
                    events.push(Event::Completed(completion));
                }
            }
        }
        taken.clear();
        self.taken = taken;
    }
}

impl Engine for RbdEngine {
    fn start(&mut self) -> io::Result<()> {
        self.ring.enable()?;
        self.ring
            .watch(self.mailbox.eventfd.as_raw_fd(), 8, MAILBOX)
    }

    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        buffers: GuestBuffers,
    ) -> Option<Completion> {
        let index = usize::from(tag);
        let (iov, count) = {
            let iovecs = buffers.iovecs();
            (iovecs.as_ptr(), iovecs.len())
        };
        let slot = &mut self.slots[index];
        slot.buffers = Some(buffers);
        slot.errno = None;
        slot.pending = 0;
        slot.published = false;
        let single = match operation {
            Operation::Read { .. } | Operation::Write { .. } => count > 0,
            Operation::Flush => true,
            Operation::Discard { segments, .. } | Operation::WriteZeroes { segments, .. } => {
                segments.len() == 1
            }
        };
        // Seen by the callback: librbd's queueing of the operation orders it before.
        self.contexts[index].single.store(single, Ordering::Release);
        let image = self.image.handle();
        let api = self.image.api();
        match operation {
            Operation::Read { .. } | Operation::Write { .. } if count == 0 => {}
            Operation::Read { offset } | Operation::Write { offset, .. } => {
                let Ok(count) = c_int::try_from(count) else {
                    self.slots[index].errno = Some(libc::EINVAL);
                    return self.done(tag);
                };
                let aio = if matches!(operation, Operation::Read { .. }) {
                    api.rbd_aio_readv
                } else {
                    // Durable when complete, `dsync` or not: librbd's cache is off (image.rs).
                    api.rbd_aio_writev
                };
                // SAFETY: `iov` is the iovec array of the buffers the slot now holds (it does not
                // move while they live), pointing at guest memory they pin; the slot keeps them
                // until this operation's completion is reaped.
                self.start(tag, |c| unsafe { aio(image, iov, count, offset, c) });
            }
            Operation::Flush => {
                // SAFETY: an open image; the operation points at no memory.
                self.start(tag, |c| unsafe { (api.rbd_aio_flush)(image, c) });
            }
            Operation::Discard { segments, .. } => {
                // Durable when complete, `dsync` or not: librbd's cache is off (image.rs).
                for s in segments {
                    // SAFETY: as for flush.
                    self.start(tag, |c| unsafe {
                        (api.rbd_aio_discard)(image, s.offset, s.len, c)
                    });
                }
            }
            Operation::WriteZeroes { segments, .. } => {
                for s in segments {
                    let Ok(len) = usize::try_from(s.len) else {
                        self.slots[index].errno.get_or_insert(libc::EINVAL);
                        continue;
                    };
                    // SAFETY: as for flush. librbd deallocates whole objects it zeroes whether or
                    // not the guest allowed unmapping; reads of them return zeroes either way.
                    self.start(tag, |c| unsafe {
                        (api.rbd_aio_write_zeroes)(image, s.offset, len, c, 0, 0)
                    });
                }
            }
        }
        if self.slots[index].pending == 0 {
            return self.done(tag);
        }
        None
    }

    fn cancel(&mut self, _which: &dyn Fn(&GuestBuffers) -> bool) -> io::Result<()> {
        // librbd has no way to cancel an operation: they end when the cluster answers or
        // librados times them out.
        Ok(())
    }

    fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> io::Result<()> {
        self.ring.watch(fd, len, token)
    }

    fn unwatch(&mut self, token: u32) -> io::Result<()> {
        self.ring.unwatch(token)
    }

    fn enter(&mut self, wait: bool) -> io::Result<()> {
        let wait = wait && !self.mail_waiting();
        self.ring.submit(usize::from(wait)).map(drop)
    }

    fn enter_timeout(&mut self, timeout: Duration) -> io::Result<bool> {
        if self.mail_waiting() {
            return self.ring.submit(0).map(|_| true);
        }
        self.ring.submit_timeout(1, timeout)
    }

    fn has_events(&mut self) -> bool {
        self.ring.has_events() || self.mail_waiting()
    }

    fn reap(&mut self, events: &mut Vec<Event>) {
        self.ring.completions(&mut self.cqes);
        let mut rearm = false;
        for cqe in &self.cqes {
            match self.ring.classify(cqe) {
                Reaped::Watch(MAILBOX, result) => {
                    // Cancelled only when the ring goes: do not re-arm then.
                    rearm = result != -libc::ECANCELED;
                }
                Reaped::Watch(token, result) => events.push(Event::Watch { token, result }),
                _ => {}
            }
        }
        if rearm {
            if let Err(e) = self
                .ring
                .watch(self.mailbox.eventfd.as_raw_fd(), 8, MAILBOX)
            {
                tracing::warn!("{}: cannot watch for RBD completions: {e}", self.image.name);
            }
        }
        self.drain(events);
    }

    /// librbd's threads do the I/O and need the CPU: a queue thread polling beside them took
    /// 10-15% of the IOPS of random reads on the two-core dev machine (docs/benchmarks.md).
    fn may_poll(&self) -> bool {
        false
    }

    fn publish_with(&mut self, publisher: Arc<dyn Publisher>) -> bool {
        self.mailbox.publisher.set(publisher).is_ok()
    }
}

impl Drop for RbdEngine {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            // SAFETY: no operation is in flight, so librbd holds no pointer to a context.
            unsafe { ManuallyDrop::drop(&mut self.contexts) };
            return;
        }
        // librbd still has operations that will call back with a context and write into the
        // buffers: leave both allocated (and the guest memory pinned).
        tracing::warn!(
            "{}: {} RBD operations still in flight; leaking their buffers",
            self.image.name,
            self.in_flight
        );
        for slot in &mut self.slots {
            if slot.pending > 0 {
                std::mem::forget(slot.buffers.take());
            }
        }
    }
}
