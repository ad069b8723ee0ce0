//! The queue loop: one thread and one io_uring per virtqueue.
//!
//! ```text
//!  kick ─▶ pop chains ─▶ parse (request.rs) ─▶ SQEs ─┐
//!                         └▶ rejected: status now     │ one io_uring_enter submits the whole
//!  CQEs ◀─────────────────────────────────────────────┘ batch and waits for the next event
//!   └▶ status byte ─▶ used ring ─▶ call, if EVENT_IDX says the driver wants one
//! ```
//!
//! With EVENT_IDX the call goes out right after a chain completes on this thread (or after the
//! batch of io_uring completions just reaped), before the rest of the avail ring is served: the
//! driver wakes up while this thread works, and has chains back in the avail ring by the time it
//! is done (QEMU's virtio-blk also notifies per completion). The driver asks for one call per
//! wait, so this adds no interrupts. Without EVENT_IDX every check would be an interrupt, so
//! there is one per round.
//!
//! The kick and control eventfds are read through the ring too, so a single
//! `io_uring_enter` both submits a batch and sleeps until the next kick or completion.
//! Every in-flight request holds a pin on the memory generation it was parsed against; its
//! host pointers stay valid until its completion has been written back.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::disk::{Backing, ZeroesMethod};
use crate::io::inline::{self, Attempt, InlineIo};
use crate::io::uring::{self, Completion, Ring};
use crate::ratelimit::RateLimit;
use crate::vhost_user::{Generation, GuestBuffers, RawBuffers, RunningQueue};

use super::bounce::AlignedBuf;
use super::device::BlockDevice;
use super::poll::PollPolicy;
use super::request::{self, Buffers, Request, RequestKind, Scratch, Segment};
use super::spec;

/// user_data tags that are not request slots.
const KICK: u64 = 1 << 62;
const WAKE: u64 = KICK + 1;
const CANCEL: u64 = KICK + 2;
/// Tags the test gate's read in front of a slot's operation.
const GATE: u64 = 1 << 61;

/// Chains taken from the ring per wakeup before completions get a turn (vhost's weight).
const BUDGET: usize = 256;

/// What ended a spell of polling.
enum Spin {
    /// The driver made chains available.
    Avail,
    /// Completions (or task work that makes them), or a control request.
    Event,
    Timeout,
}

const STATUS_OK: u8 = spec::VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = spec::VIRTIO_BLK_S_IOERR as u8;

/// One request in flight.
struct Slot {
    head: u16,
    request: Option<Request>,
    /// Its guest buffers, pinned until it is complete (vhost_user/buffers.rs).
    buffers: Option<GuestBuffers>,
    /// A finished request's buffers, kept for their capacity.
    spare: RawBuffers,
    segments: Vec<Segment>,
    /// For a read or write: where, and how much is left.
    offset: u64,
    remaining: u64,
    /// SQEs whose completions are outstanding.
    pending: u32,
    errno: Option<i32>,
    bounce: Option<AlignedBuf>,
    bounce_iov: libc::iovec,
    bounced: bool,
    /// Where the test gate's byte lands.
    gate_byte: u8,
}

// SAFETY: `bounce_iov` points into `bounce`, owned by the slot; a slot is only ever used by the
// queue thread that owns the server.
unsafe impl Send for Slot {}

impl Slot {
    fn new() -> Slot {
        Slot {
            head: 0,
            request: None,
            buffers: None,
            spare: RawBuffers::default(),
            segments: Vec::new(),
            offset: 0,
            remaining: 0,
            pending: 0,
            errno: None,
            bounce: None,
            bounce_iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            bounced: false,
            gate_byte: 0,
        }
    }

    /// The iovecs the next SQE should use.
    fn io_vectors(&self) -> (*const libc::iovec, u32) {
        match &self.buffers {
            Some(buffers) if !self.bounced => {
                let rest = buffers.iovecs();
                (rest.as_ptr(), rest.len() as u32)
            }
            _ => (&self.bounce_iov, 1),
        }
    }

    /// Moves past `done` bytes after a short read or write.
    fn advance(&mut self, done: u64) {
        self.offset += done;
        self.remaining -= done;
        if self.bounced {
            // SAFETY: stays inside the bounce buffer: done <= remaining <= its length.
            self.bounce_iov.iov_base =
                unsafe { self.bounce_iov.iov_base.cast::<u8>().add(done as usize) }.cast();
            self.bounce_iov.iov_len -= done as usize;
            return;
        }
        if let Some(buffers) = &mut self.buffers {
            buffers.advance(done);
        }
    }
}

pub struct QueueServer {
    device: Arc<BlockDevice>,
    q: RunningQueue,
    ring: Ring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    scratch: Scratch,
    completions: Vec<Completion>,
    /// Where the ring reads the kick and control eventfds' counters.
    eventfd_bufs: Box<[u64; 2]>,
    /// The generation the ring itself (descriptor table, avail, used) is accessed through.
    generation: Arc<Generation>,
    kicked: bool,
    /// Every slot is in flight: take more chains once a completion frees one.
    starved: bool,
    /// Chains were left in the ring (budget spent or no free slot): look again without a kick.
    backlog: bool,
    used_added: bool,
    /// The driver corrupted the ring (avail index jump): stop touching it until reset.
    broken: bool,
    /// The driver is told to kick (avail_event or flags are current); off while the thread
    /// works or polls, so a busy driver does not kick at all.
    kicks_on: bool,
    poll: PollPolicy,
    /// Requests completed so far, for the polling policy's epochs.
    done: u64,
    /// Whether this thread reads and writes the backing itself first (io/inline.rs); a
    /// filesystem that refuses RWF_NOWAIT for writes turns that off at the first refusal.
    inline_read: InlineIo,
    inline_write: InlineIo,
    backing_fd: Option<std::os::fd::RawFd>,
    guest_errors: RateLimit,
    io_errors: RateLimit,
}

impl QueueServer {
    pub fn new(device: Arc<BlockDevice>, q: RunningQueue) -> io::Result<QueueServer> {
        let size = usize::from(q.queue.size());
        let backing = match &device.disk.backing {
            Backing::File { file, .. } => Some(std::os::fd::AsRawFd::as_raw_fd(file)),
            Backing::Null => None,
        };
        // Room for a full ring of requests plus the two eventfd reads; requests with several
        // SQEs (discard segments) submit early when it fills.
        let ring = Ring::new((size as u32 + 2).next_power_of_two().max(8), backing)?;
        let generation = q.memory.current();
        let poll_max = device.poll_max;
        // The test gate holds operations in the ring; inline ones would slip past it.
        let gated = device.test_gate.is_some();
        Ok(QueueServer {
            inline_read: if gated {
                InlineIo::Never
            } else {
                device.disk.inline_read
            },
            inline_write: if gated {
                InlineIo::Never
            } else {
                device.disk.inline_write
            },
            device,
            ring,
            slots: (0..size).map(|_| Slot::new()).collect(),
            free: (0..size as u32).rev().collect(),
            in_flight: 0,
            scratch: Scratch::default(),
            completions: Vec::with_capacity(size + 2),
            eventfd_bufs: Box::new([0; 2]),
            generation,
            q,
            kicked: true,
            starved: false,
            backlog: false,
            used_added: false,
            broken: false,
            kicks_on: false,
            poll: PollPolicy::new(poll_max),
            done: 0,
            backing_fd: backing,
            guest_errors: RateLimit::new(10, Duration::from_secs(5)),
            io_errors: RateLimit::new(10, Duration::from_secs(5)),
        })
    }

    fn arm_kick(&mut self) -> io::Result<()> {
        let entry = Ring::read_eventfd(&self.q.kick, &mut self.eventfd_bufs[0], KICK);
        // SAFETY: eventfd_bufs is boxed and lives as long as the server, which cancels both
        // eventfd reads and reaps them before it is dropped (see `shutdown`).
        unsafe { self.ring.push(&entry) }
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = Ring::read_eventfd(self.q.control.wake_fd(), &mut self.eventfd_bufs[1], WAKE);
        // SAFETY: as in arm_kick.
        unsafe { self.ring.push(&entry) }
    }

    /// Serves the queue until told to stop; returns it with every taken request completed.
    pub fn run(mut self) -> Queue {
        if let Err(e) = self.serve() {
            tracing::error!("queue {} stopped: io_uring failed: {e}", self.q.index);
        }
        if self.shutdown() {
            return self.q.queue;
        }
        // The ring could not be drained: the kernel may still write into what this server
        // owns (slot iovecs and bounce buffers, eventfd counters, guest memory its slots pin).
        // Leak all of it rather than free it under the kernel.
        let queue = std::mem::take(&mut self.q.queue);
        std::mem::forget(self);
        queue
    }

    fn serve(&mut self) -> io::Result<()> {
        self.ring.enable()?;
        self.arm_kick()?;
        self.arm_wake()?;
        loop {
            // Submit what the last round queued, and sleep until something happens unless
            // there is work to do already (or polling found some).
            let runnable = self.q.control.enabled() && !self.broken;
            let mut idle_since = None;
            let mut ready = self.ready();
            if runnable && !ready {
                idle_since = Some(Instant::now());
                ready = self.idle()?;
            }
            self.ring.submit(usize::from(!(runnable && ready)))?;
            let now = Instant::now();
            if let Some(since) = idle_since {
                self.poll.after_idle(now.duration_since(since));
            }
            if let Some(epoch) = self.poll.tick(now, self.done) {
                if let Some(stats) = self.device.stats.get(self.q.index) {
                    stats.record_epoch(epoch);
                }
            }
            self.generation = self.q.memory.current();
            self.reap()?;
            self.notify_early();
            if self.q.control.stop_requested() {
                return Ok(());
            }
            if self.ready() && self.q.control.enabled() && !self.broken {
                self.kicked = false;
                self.process_avail();
            }
            self.notify();
        }
    }

    /// Whether the avail ring has work this thread can take now.
    fn ready(&self) -> bool {
        self.backlog || self.kicked || (self.starved && !self.free.is_empty())
    }

    /// Nothing to do: poll for a while (the adaptive window), then turn kicks back on.
    /// `true` if there is work after all, so the thread must not sleep.
    fn idle(&mut self) -> io::Result<bool> {
        if self.starved {
            // Chains are waiting but every slot is in flight: only a completion helps, and
            // it wakes the ring anyway.
            return Ok(false);
        }
        // Poll only for new requests: with requests in flight on the ring, their completion
        // wakes the thread anyway, and spinning through a device's latency (a disk read is
        // ~100 µs) would cost a core for nothing the driver sees.
        //
        // Nor after such a sleep (kicks are on then): a driver waiting on a slow device wakes
        // up slowly too, and the thread would spin through that. Measured at iodepth 1 on the
        // disk (docs/benchmarks.md), polling after each completion cost 1.2-1.3x the CPU per
        // I/O of sleeping until the kick, for no gain in IOPS; yielding the CPU in the spin
        // (the driver is often woken on this CPU) did not win it back and slowed the null disk.
        let window = self.poll.window();
        if !window.is_zero() && !self.kicks_on && self.in_flight == 0 {
            // Start the I/O this round queued before spinning on its completion.
            self.ring.submit(0)?;
            match self.spin(window) {
                Spin::Avail => {
                    self.kicked = true;
                    return Ok(true);
                }
                Spin::Event => return Ok(true),
                Spin::Timeout => {}
            }
        }
        if self.kicks_on {
            return Ok(false);
        }
        // Re-enable kicks, then look once more: a chain made available just before would
        // otherwise wait for a kick the driver never sends.
        let memory = self.q.memory.current();
        match self.q.queue.enable_notification(memory.memory()) {
            Ok(true) => {
                self.kicked = true;
                Ok(true)
            }
            Ok(false) => {
                self.kicks_on = true;
                Ok(false)
            }
            Err(e) => {
                self.mark_broken(&e);
                Ok(false)
            }
        }
    }

    /// Busy-polls the avail index, the completion queue and the control flags for up to
    /// `window`. The driver does not kick meanwhile: its notifications are off.
    fn spin(&mut self, window: Duration) -> Spin {
        let start = Instant::now();
        let memory = self.q.memory.current();
        let stats = self.device.stats.get(self.q.index);
        let outcome = loop {
            match self
                .q
                .queue
                .avail_idx(memory.memory(), std::sync::atomic::Ordering::Acquire)
            {
                Ok(idx) if idx.0 != self.q.queue.next_avail() => break Spin::Avail,
                Ok(_) => {}
                // Let the ring code find (and report) what is wrong.
                Err(_) => break Spin::Avail,
            }
            if self.ring.has_events() || self.q.control.stop_requested() {
                break Spin::Event;
            }
            if start.elapsed() >= window {
                break Spin::Timeout;
            }
            std::hint::spin_loop();
        };
        if let Some(stats) = stats {
            stats.record_poll(start.elapsed(), !matches!(outcome, Spin::Timeout));
        }
        outcome
    }

    /// Handles every ready completion: request I/O, kicks, control wakeups.
    fn reap(&mut self) -> io::Result<()> {
        let mut completions = std::mem::take(&mut self.completions);
        self.ring.completions(&mut completions);
        for c in &completions {
            match c.user_data() {
                KICK => {
                    self.kicked = true;
                    if let Some(stats) = self.device.stats.get(self.q.index) {
                        stats.record_kick();
                    }
                    self.arm_kick()?;
                }
                WAKE => {
                    // Enabled, stopping or cancelling: look at the ring again either way.
                    self.kicked = true;
                    self.arm_wake()?;
                    let regions = self.q.control.take_cancels();
                    if !regions.is_empty() {
                        self.cancel_where(|slot| {
                            slot.buffers.as_ref().is_some_and(|b| b.uses_any(&regions))
                        })?;
                    }
                }
                CANCEL => {}
                gate if gate & GATE != 0 => {
                    self.complete_io((gate & !GATE) as usize, c.result(), true)?
                }
                slot => self.complete_io(slot as usize, c.result(), false)?,
            }
        }
        self.completions = completions;
        Ok(())
    }

    /// Takes chains from the avail ring, parses them and starts their I/O. Kicks stay off
    /// until the thread is about to sleep (see `idle`).
    fn process_avail(&mut self) {
        self.backlog = false;
        self.starved = false;
        let mut generation = self.generation.clone();
        let size = self.q.queue.size();
        if self.kicks_on {
            if let Err(e) = self.q.queue.disable_notification(generation.memory()) {
                return self.mark_broken(&e);
            }
            self.kicks_on = false;
        }
        for _ in 0..BUDGET {
            if self.free.is_empty() {
                // Only a driver that reuses heads still in flight gets here: wait for
                // completions to free a slot.
                self.starved = true;
                return;
            }
            // Each chain is parsed against the newest memory table (the frontend may have
            // replaced it since the last chain), never a retired one.
            let latest = self.q.memory.current();
            if !Arc::ptr_eq(&latest, &generation) {
                generation = latest;
                self.generation = generation.clone();
            }
            let chain = match self.q.queue.iter(generation.memory()) {
                Ok(mut iter) => iter.next(),
                Err(e) => return self.mark_broken(&e),
            };
            let Some(chain) = chain else { return };
            let head = chain.head_index();
            if head >= size {
                return self.mark_broken(&format!(
                    "the driver made head {head} available in a ring of {size}"
                ));
            }
            self.start_request(head, chain, &generation);
            self.notify_early();
        }
        // Let completions and other queues have a turn; come back without a kick.
        self.backlog = true;
    }

    /// Like the kernel's vq_err: a driver that corrupts its ring loses the queue until it
    /// resets it; the daemon and every other queue carry on.
    fn mark_broken(&mut self, e: &dyn std::fmt::Display) {
        tracing::error!(
            "queue {}: the driver corrupted the ring ({e}); queue stopped until reset",
            self.q.index
        );
        self.broken = true;
    }

    fn start_request(
        &mut self,
        head: u16,
        chain: virtio_queue::DescriptorChain<&vm_memory::GuestMemoryMmap>,
        generation: &Arc<Generation>,
    ) {
        let Some(index) = self.free.pop() else { return };
        let index = index as usize;
        let slot = &mut self.slots[index];
        let mut raw = std::mem::take(&mut slot.spare);
        let parsed = request::parse(
            chain,
            generation.memory(),
            &self.device.limits,
            &mut self.scratch,
            Buffers {
                iovecs: raw.iovecs_mut(),
                segments: &mut slot.segments,
            },
        );
        slot.head = head;
        slot.errno = None;
        slot.pending = 0;
        slot.bounced = false;
        self.in_flight += 1;
        let status = match &parsed {
            Ok(req) => Some(req.status),
            Err(rejection) => rejection.status,
        };
        let buffers = generation.pin(raw, status.map(|s| s.as_ptr()));
        let complete = buffers.is_complete();
        slot.buffers = Some(buffers);
        match parsed {
            Ok(req) if complete => {
                slot.request = Some(req);
                if let Err(e) = self.submit_request(index, req) {
                    self.log_io_error(index, &e);
                    self.finish(index, STATUS_IOERR);
                }
            }
            parsed => {
                let (code, reason) = match &parsed {
                    Ok(_) => (
                        STATUS_IOERR,
                        "guest gave buffers in memory being removed".to_string(),
                    ),
                    Err(rejection) => (rejection.code, rejection.error.to_string()),
                };
                if let Some(suppressed) = self.guest_errors.check(Instant::now()) {
                    tracing::warn!(
                        "queue {}: request {head} refused: {reason}{}",
                        self.q.index,
                        suppressed_note(suppressed)
                    );
                }
                if let Some(stats) = self.device.stats.get(self.q.index) {
                    stats.record_refused();
                }
                let written = slot.buffers.as_mut().is_some_and(|b| b.write_status(code));
                self.release(index, u32::from(written));
            }
        }
    }

    /// Starts the I/O of a parsed request, or completes it at once when there is none to do.
    fn submit_request(&mut self, index: usize, req: Request) -> io::Result<()> {
        let device = self.device.clone();
        let null = matches!(device.disk.backing, Backing::Null);
        let slot = &mut self.slots[index];
        match req.kind {
            RequestKind::GetId => {
                if let Some(buffers) = &mut slot.buffers {
                    // The parser capped the buffers at the serial's 20 bytes.
                    buffers.copy_in(&device.config.serial);
                }
                self.finish(index, STATUS_OK);
            }
            RequestKind::Read if null => {
                if let Some(buffers) = &mut slot.buffers {
                    buffers.zero();
                }
                self.finish(index, STATUS_OK);
            }
            _ if null => self.finish(index, STATUS_OK),
            RequestKind::Read | RequestKind::Write => {
                slot.offset = req.offset;
                slot.remaining = req.len;
                if req.len == 0 {
                    self.finish(index, STATUS_OK);
                    return Ok(());
                }
                if device.disk.direct
                    && slot.buffers.as_ref().is_some_and(|b| {
                        misaligned(b.iovecs(), device.disk.dio_align.memory as usize)
                    })
                {
                    self.prepare_bounce(index, req)?;
                }
                if self.try_inline(index, req.kind) {
                    return Ok(());
                }
                self.push_rw(index)?;
            }
            RequestKind::Flush => {
                let entry = self.ring.fdatasync(index as u64);
                self.push_for(index, &entry)?;
            }
            RequestKind::Discard => {
                for i in 0..slot.segments.len() {
                    let s = self.slots[index].segments[i];
                    let entry =
                        self.ring
                            .fallocate(uring::PUNCH_HOLE, s.offset, s.len, index as u64);
                    self.push_for(index, &entry)?;
                }
            }
            RequestKind::WriteZeroes => {
                let method = device.disk.write_zeroes.unwrap_or(ZeroesMethod::ZeroRange);
                for i in 0..slot.segments.len() {
                    let s = self.slots[index].segments[i];
                    let user_data = index as u64;
                    if s.unmap && device.disk.punch_hole {
                        let entry =
                            self.ring
                                .fallocate(uring::PUNCH_HOLE, s.offset, s.len, user_data);
                        self.push_for(index, &entry)?;
                    } else if method == ZeroesMethod::PunchThenAllocate {
                        let punch = uring::linked(self.ring.fallocate(
                            uring::PUNCH_HOLE,
                            s.offset,
                            s.len,
                            user_data,
                        ));
                        self.push_for(index, &punch)?;
                        let allocate =
                            self.ring
                                .fallocate(uring::ALLOCATE, s.offset, s.len, user_data);
                        self.push_for(index, &allocate)?;
                    } else {
                        let entry =
                            self.ring
                                .fallocate(uring::ZERO_RANGE, s.offset, s.len, user_data);
                        self.push_for(index, &entry)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Does a read or write on this thread if the disk allows it (io/inline.rs). `true` when
    /// the request is finished; otherwise what is left of it goes to io_uring.
    fn try_inline(&mut self, index: usize, kind: RequestKind) -> bool {
        let write = kind == RequestKind::Write;
        let mode = if write {
            self.inline_write
        } else {
            self.inline_read
        };
        let Some(fd) = self.backing_fd.filter(|_| mode != InlineIo::Never) else {
            return false;
        };
        let dsync = write && !self.device.config.writeback();
        let mapping = self
            .device
            .disk
            .mapping
            .as_ref()
            .filter(|m| mode == InlineIo::Memory && m.intact());
        if let Some(mapping) = mapping {
            let slot = &self.slots[index];
            let iovecs = slot.buffers.as_ref().map_or(&[][..], |b| b.iovecs());
            // SAFETY: the iovecs point into guest memory the slot's buffers pin, never into
            // the image.
            if unsafe { mapping.copy(write, iovecs, slot.offset) } {
                self.finish_inline(index);
                return true;
            }
            if !mapping.intact() {
                // This copy found the file shrunk under the mapping (io/mapped.rs); later
                // requests use system calls, which see the new size.
                self.fail_inline(
                    index,
                    &io::Error::other("the image file was truncated while in use"),
                );
                return true;
            }
        }
        let slot = &mut self.slots[index];
        let (iov, count) = slot.io_vectors();
        // SAFETY: the iovecs live in the slot's buffers and point into guest memory they pin
        // (or into its bounce buffer); the call is synchronous.
        let attempt = unsafe { inline::transfer(fd, write, iov, count, slot.offset, mode, dsync) };
        let error = match attempt {
            Attempt::Done(done) if done as u64 >= slot.remaining => {
                self.finish_inline(index);
                return true;
            }
            // End of file inside the capacity: the image shrank under us.
            Attempt::Done(0) => io::Error::from_raw_os_error(libc::EIO),
            Attempt::Done(done) => {
                slot.advance(done as u64);
                return false;
            }
            Attempt::WouldBlock => return false,
            Attempt::Unsupported => {
                tracing::debug!(
                    "queue {}: {} refuses RWF_NOWAIT for {kind:?}s; using io_uring only",
                    self.q.index,
                    self.device.disk.name
                );
                if write {
                    self.inline_write = InlineIo::Never;
                } else {
                    self.inline_read = InlineIo::Never;
                }
                return false;
            }
            Attempt::Failed(e) => e,
        };
        self.fail_inline(index, &error);
        true
    }

    /// Finishes a read or write done on this thread. (Never a bounced one: inline I/O is
    /// off with O_DIRECT, the only reason to bounce.)
    fn finish_inline(&mut self, index: usize) {
        if let Some(stats) = self.device.stats.get(self.q.index) {
            stats.record_inline();
        }
        self.finish(index, STATUS_OK);
    }

    /// Fails a read or write done on this thread with `error` (EIO when it has no errno).
    fn fail_inline(&mut self, index: usize, error: &io::Error) {
        self.slots[index].errno = error.raw_os_error().or(Some(libc::EIO));
        self.log_io_error(index, error);
        self.finish(index, STATUS_IOERR);
    }

    /// O_DIRECT with guest buffers that are not aligned: go through an aligned copy.
    fn prepare_bounce(&mut self, index: usize, req: Request) -> io::Result<()> {
        let align = self.device.disk.dio_align.memory as usize;
        let slot = &mut self.slots[index];
        let len = req.len as usize;
        if slot.bounce.as_ref().is_none_or(|b| b.len() < len) {
            slot.bounce = Some(
                AlignedBuf::new(len, align)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?,
            );
        }
        let Some(bounce) = slot.bounce.as_mut() else {
            unreachable!("allocated above")
        };
        if req.kind == RequestKind::Write {
            if let Some(buffers) = &slot.buffers {
                buffers.copy_out(&mut bounce.as_mut_slice()[..len]);
            }
        }
        slot.bounce_iov = libc::iovec {
            iov_base: bounce.as_ptr().cast(),
            iov_len: len,
        };
        slot.bounced = true;
        Ok(())
    }

    fn push_rw(&mut self, index: usize) -> io::Result<()> {
        let slot = &self.slots[index];
        let Some(req) = slot.request else {
            return Ok(());
        };
        let (iov, count) = slot.io_vectors();
        let entry = if req.kind == RequestKind::Read {
            self.ring.readv(iov, count, slot.offset, index as u64)
        } else {
            self.ring.writev(
                iov,
                count,
                slot.offset,
                !self.device.config.writeback(),
                index as u64,
            )
        };
        self.push_for(index, &entry)
    }

    fn push_for(&mut self, index: usize, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        if let Some(gate) = &self.device.test_gate {
            let byte: *mut u8 = &mut self.slots[index].gate_byte;
            let read = uring::linked(Ring::read_byte(
                std::os::fd::AsRawFd::as_raw_fd(gate),
                byte,
                GATE | index as u64,
            ));
            // SAFETY: the byte lives in the slot, which is not reused before this completes.
            unsafe { self.ring.push(&read) }?;
            self.slots[index].pending += 1;
        }
        // SAFETY: the entry points at the slot's iovec array (or bounce buffer) and, through
        // it, at guest memory pinned by the slot; the slot is neither reused nor unpinned
        // until `pending` drops to zero, i.e. until this entry's completion is reaped.
        unsafe { self.ring.push(entry) }?;
        self.slots[index].pending += 1;
        Ok(())
    }

    /// Records a request's first error; a cancellation is counted once per request.
    fn note_error(&mut self, index: usize, errno: i32) {
        let slot = &mut self.slots[index];
        if slot.errno.is_none() {
            slot.errno = Some(errno);
            if errno == libc::ECANCELED {
                self.q
                    .memory
                    .stats()
                    .cancelled
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// Cancels the operations of every in-flight request `matches` picks; they complete with
    /// -ECANCELED and so with IOERR.
    fn cancel_where(&mut self, matches: impl Fn(&Slot) -> bool) -> io::Result<()> {
        let targets: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].pending > 0 && matches(&self.slots[i]))
            .collect();
        for index in targets {
            for target in [index as u64, GATE | index as u64] {
                let entry = Ring::cancel_all(target, CANCEL);
                // SAFETY: a cancel request points at no memory.
                unsafe { self.ring.push(&entry) }?;
            }
        }
        Ok(())
    }

    /// One completion of a request's operations (`gate`: the test gate's read in front of
    /// one); the request finishes with its last.
    fn complete_io(&mut self, index: usize, result: i32, gate: bool) -> io::Result<()> {
        if index >= self.slots.len() {
            tracing::error!(
                "queue {}: completion for unknown slot {index}",
                self.q.index
            );
            return Ok(());
        }
        self.slots[index].pending = self.slots[index].pending.saturating_sub(1);
        if result < 0 {
            // A linked SQE cancelled because its predecessor failed keeps the first error.
            self.note_error(index, -result);
        }
        let slot = &mut self.slots[index];
        let kind = slot.request.map(|r| r.kind);
        if result >= 0
            && !gate
            && matches!(kind, Some(RequestKind::Read | RequestKind::Write))
            && slot.errno.is_none()
        {
            let done = result as u64;
            if done == 0 && slot.remaining > 0 {
                // End of file inside the capacity: the image shrank under us.
                slot.errno = Some(libc::EIO);
            } else if done < slot.remaining {
                slot.advance(done);
                return self.push_rw(index);
            }
        }
        if slot.pending > 0 {
            return Ok(());
        }
        let status = match slot.errno {
            None => {
                if kind == Some(RequestKind::Read) && slot.bounced {
                    if let (Some(bounce), Some(buffers)) = (&slot.bounce, &mut slot.buffers) {
                        let len = buffers.len() as usize;
                        buffers.copy_in(&bounce.as_slice()[..len]);
                    }
                }
                STATUS_OK
            }
            Some(errno) => {
                let e = io::Error::from_raw_os_error(errno);
                self.log_io_error(index, &e);
                STATUS_IOERR
            }
        };
        self.finish(index, status);
        Ok(())
    }

    fn log_io_error(&mut self, index: usize, e: &io::Error) {
        let slot = &self.slots[index];
        if let Some(suppressed) = self.io_errors.check(Instant::now()) {
            tracing::warn!(
                "queue {}: {:?} at byte {} failed on {}: {e}{}",
                self.q.index,
                slot.request.map(|r| r.kind),
                slot.offset,
                self.device.disk.name,
                suppressed_note(suppressed)
            );
        }
    }

    /// Writes the status of a request and returns its chain to the driver.
    fn finish(&mut self, index: usize, status: u8) {
        let slot = &mut self.slots[index];
        let Some(req) = slot.request else { return };
        if let Some(stats) = self.device.stats.get(self.q.index) {
            stats.record(req.kind, req.len, status == STATUS_OK);
        }
        if let Some(buffers) = &mut slot.buffers {
            buffers.write_status(status);
        }
        // Bytes the device wrote into the driver's writable buffers, status included.
        let written = match req.kind {
            RequestKind::Read | RequestKind::GetId => req.len as u32 + 1,
            _ => 1,
        };
        self.release(index, written);
    }

    fn release(&mut self, index: usize, used_len: u32) {
        let head = self.slots[index].head;
        self.done += 1;
        if let Err(e) = self
            .q
            .queue
            .add_used(self.generation.memory(), head, used_len)
        {
            tracing::error!(
                "queue {}: cannot return request {head} to the driver: {e}",
                self.q.index
            );
        }
        self.used_added = true;
        // Status and used entry are written: now the regions may retire and the generation
        // unmap.
        let slot = &mut self.slots[index];
        slot.request = None;
        if let Some(buffers) = slot.buffers.take() {
            slot.spare = buffers.release();
        }
        self.free.push(index as u32);
        self.in_flight -= 1;
    }

    /// Interrupts now, mid-batch, if the driver wants one and EVENT_IDX keeps that to one
    /// per wait of the driver (see the module comment).
    fn notify_early(&mut self) {
        if self.q.queue.event_idx_enabled() {
            self.notify();
        }
    }

    /// One interrupt for everything completed since the last, if the driver wants one.
    fn notify(&mut self) {
        if !std::mem::take(&mut self.used_added) {
            return;
        }
        match self.q.queue.needs_notification(self.generation.memory()) {
            Ok(false) => {}
            // When in doubt, interrupt: a spurious interrupt costs less than a hung guest.
            Ok(true) | Err(_) => {
                self.q.call.signal();
                if let Some(stats) = self.device.stats.get(self.q.index) {
                    stats.record_call();
                }
            }
        }
    }

    /// Completes everything in flight, then cancels the eventfd reads so nothing the kernel
    /// holds points into this server when it is dropped. `false` if the ring failed and that
    /// cannot be known.
    fn shutdown(&mut self) -> bool {
        let mut outstanding_reads = 2;
        let cancels = [Ring::cancel(KICK, CANCEL), Ring::cancel(WAKE, CANCEL)];
        for entry in &cancels {
            // SAFETY: a cancel request points at no memory.
            if unsafe { self.ring.push(entry) }.is_err() {
                break;
            }
        }
        // Requests get the device's bound to complete; then they are cancelled, and the
        // cancellations are waited for: nothing may write guest memory after this returns.
        let bound = self.device.retire_timeout;
        let start = Instant::now();
        let mut cancelled = false;
        while self.in_flight > 0 || outstanding_reads > 0 {
            let submitted = if cancelled {
                self.ring.submit(1).map(|_| true)
            } else {
                let left = bound
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1));
                self.ring.submit_timeout(1, left)
            };
            match submitted {
                Ok(true) => {}
                Ok(false) => {
                    cancelled = true;
                    if self.in_flight > 0 {
                        tracing::warn!(
                            "queue {}: stopping with {} request(s) still in flight after {} ms; cancelling them",
                            self.q.index,
                            self.in_flight,
                            start.elapsed().as_millis()
                        );
                        if let Err(e) = self.cancel_where(|_| true) {
                            tracing::error!("queue {}: cannot cancel: {e}", self.q.index);
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!("queue {}: cannot drain the ring: {e}", self.q.index);
                    return false;
                }
            }
            self.generation = self.q.memory.current();
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.completions(&mut completions);
            for c in &completions {
                match c.user_data() {
                    KICK | WAKE => outstanding_reads -= 1,
                    CANCEL => {}
                    slot => {
                        let gate = slot & GATE != 0;
                        if let Err(e) = self.complete_io((slot & !GATE) as usize, c.result(), gate)
                        {
                            tracing::error!("queue {}: {e}", self.q.index);
                        }
                    }
                }
            }
            self.completions = completions;
        }
        self.notify();
        true
    }
}

fn misaligned(iovecs: &[libc::iovec], align: usize) -> bool {
    iovecs
        .iter()
        .any(|v| (v.iov_base as usize) % align != 0 || v.iov_len % align != 0)
}

fn suppressed_note(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} similar messages suppressed)")
    }
}
