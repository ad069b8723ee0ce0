//! The queue loop: one thread per virtqueue, between the virtqueue and the queue's I/O engine.
//!
//! ```text
//!  kick ─▶ pop chains ─▶ parse (request.rs) ─▶ pin (GuestBuffers) ─▶ engine.submit ─┐
//!                         └▶ rejected: status now                                    │
//!  engine completions ◀──────────────────────────────────────────────────────────────┘
//!   └▶ status byte ─▶ used ring ─▶ release the buffers ─▶ call, if the driver wants one
//! ```
//!
//! The engine (io/engine.rs) does the I/O and owns each request's buffers until its completion;
//! this loop only knows virtqueues and requests. The kick and control eventfds are watched
//! through the engine too, so a single system call (`io_uring_enter`) both submits a batch and
//! sleeps until the next kick, control change or completion.
//!
//! With EVENT_IDX the call goes out right after a chain completes on this thread (or after the
//! batch of completions just reaped), before the rest of the avail ring is served: the driver
//! wakes up while this thread works, and has chains back in the avail ring by the time it is
//! done (QEMU's virtio-blk also notifies per completion). The driver asks for one call per
//! wait, so this adds no interrupts. Without EVENT_IDX every check would be an interrupt, so
//! there is one per round.
//!
//! An engine that completes requests on threads of its own may return them to the driver from
//! there while this thread sleeps (direct.rs); this thread then only retires them.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{ArcMutexGuard, Mutex, RawMutex};
use virtio_queue::{Queue, QueueOwnedT, QueueT};

use crate::io::{Completion, DiskEngine, Engine, Event, Operation, Tag};
use crate::qos::Quota;
use crate::ratelimit::RateLimit;
use crate::vhost_user::{ChainWalk, Generation, GuestBuffers, RawBuffers, RunningQueue};

use super::device::BlockDevice;
use super::direct::{Direct, Publishable, Ring};
use super::poll::PollPolicy;
use super::request::{self, Buffers, Limits, Request, RequestKind, Scratch, Segment};
use super::spec;

/// Watch tokens of the kick and control eventfds.
const KICK: u32 = 0;
const WAKE: u32 = 1;

/// Chains taken from the ring per wakeup before completions get a turn (vhost's weight).
const BUDGET: usize = 256;

/// The longest a throttled queue sleeps before it looks at the limits again, so that `vublk
/// export set` raising or removing them takes effect at once, even after a request that
/// overfilled a bucket for a long time.
const THROTTLE_RECHECK: Duration = Duration::from_millis(100);

/// The export's QoS limits ran out (qos/): the queue takes no chain before `until`.
#[derive(Clone, Copy)]
struct Throttled {
    since: Instant,
    until: Instant,
}

/// The split used ring's layout: flags (2 bytes), idx (2), then 8-byte elements.
const USED_IDX_OFFSET: u64 = 2;
const USED_RING_OFFSET: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;

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

/// One request: its head, and what it asked; its index is the engine's tag.
#[derive(Default)]
struct Slot {
    head: u16,
    /// Set while the request is in flight (its buffers are then the engine's).
    request: Option<Request>,
    /// A finished request's buffers, kept for their allocations.
    spare: Option<RawBuffers>,
    segments: Vec<Segment>,
    /// When the request was taken from the ring, for the latency histogram.
    started: Option<Instant>,
}

/// The queue thread's hold on its ring while it is awake (direct.rs).
type Held = ArcMutexGuard<RawMutex, Ring>;

/// The ring, which the queue thread holds whenever it runs anything but its sleep.
#[track_caller]
fn held(ring: &mut Option<Held>) -> &mut Ring {
    ring.as_deref_mut()
        .expect("the queue thread holds its ring while awake")
}

/// The loop of one queue over its engine: the disk's (`io::engine_for`), or a test's.
pub struct QueueServer<E = DiskEngine> {
    device: Arc<BlockDevice>,
    /// The queue; its virtqueue and inflight tracker are in `ring`.
    q: RunningQueue,
    /// The virtqueue and the inflight tracker, shared with the engine's threads when it
    /// publishes (direct.rs); `ring` is the hold on it, `None` while lent.
    shared: Arc<Mutex<Ring>>,
    ring: Option<Held>,
    /// The engine returns requests to the driver itself while this thread sleeps.
    direct: bool,
    engine: E,
    slots: Vec<Slot>,
    free: Vec<Tag>,
    in_flight: usize,
    /// The device's limits; the capacity is refreshed for every chain (it grows on resize).
    limits: Limits,
    scratch: Scratch,
    events: Vec<Event>,
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
    /// Set while the export is over its QoS limits: the thread neither takes chains nor
    /// polls, and sleeps (kicks off) until the buckets let a request start.
    throttled: Option<Throttled>,
    /// Requests completed so far, for the polling policy's epochs.
    done: u64,
    guest_errors: RateLimit,
    io_errors: RateLimit,
    /// The latency histogram's clock, read per batch rather than per request (two clock reads
    /// per request cost 6% of the backend's CPU per request on a null disk at iodepth 32;
    /// docs/operations.md): a request is taken at `pass_start`, the time this pass of the loop
    /// began (read after the wait anyway), and completes at `batch_end`, read at the first
    /// completion of a batch and shared by the rest of it.
    pass_start: Instant,
    batch_end: Option<Instant>,
}

impl QueueServer {
    /// The loop of `q`, with the engine the device's disk calls for (`io::engine_for`).
    pub fn new(device: Arc<BlockDevice>, q: RunningQueue) -> io::Result<QueueServer> {
        let gate = device.test_gate.as_ref();
        let engine = crate::io::engine_for(&device.disk, gate, q.queue.size())?;
        Ok(QueueServer::with_engine(device, q, engine))
    }
}

impl<E: Engine> QueueServer<E> {
    /// The loop of `q` over `engine`, which must serve tags up to the queue's size.
    pub fn with_engine(
        device: Arc<BlockDevice>,
        mut q: RunningQueue,
        mut engine: E,
    ) -> QueueServer<E> {
        let size = q.queue.size();
        let shared = Arc::new(Mutex::new(Ring::new(
            std::mem::take(&mut q.queue),
            q.inflight.take(),
        )));
        let direct = engine.publish_with(Arc::new(Direct {
            ring: shared.clone(),
            device: device.clone(),
            index: q.index,
            memory: q.memory.clone(),
            call: q.call.clone(),
            control: q.control.clone(),
            log: q.log.clone(),
        }));
        let ring = Some(shared.lock_arc());
        let generation = q.memory.current();
        let poll_max = if engine.may_poll() {
            device.poll_max
        } else {
            Duration::ZERO
        };
        let limits = device.limits.clone();
        QueueServer {
            limits,
            device,
            engine,
            slots: (0..size).map(|_| Slot::default()).collect(),
            free: (0..size).rev().collect(),
            in_flight: 0,
            scratch: Scratch::default(),
            events: Vec::with_capacity(usize::from(size) + 2),
            generation,
            q,
            shared,
            ring,
            direct,
            kicked: true,
            starved: false,
            backlog: false,
            used_added: false,
            broken: false,
            kicks_on: false,
            poll: PollPolicy::new(poll_max),
            throttled: None,
            done: 0,
            guest_errors: RateLimit::new(10, Duration::from_secs(5)),
            io_errors: RateLimit::new(10, Duration::from_secs(5)),
            pass_start: Instant::now(),
            batch_end: None,
        }
    }

    fn watch_kick(&mut self) -> io::Result<()> {
        self.engine.watch(self.q.kick.as_raw_fd(), 8, KICK)
    }

    fn watch_wake(&mut self) -> io::Result<()> {
        let fd = self.q.control.wake_fd().as_raw_fd();
        self.engine.watch(fd, 8, WAKE)
    }

    /// Serves the queue until told to stop; returns it with every taken request completed.
    pub fn run(mut self) -> Queue {
        if let Err(e) = self.serve() {
            tracing::error!("queue {} stopped: its I/O engine failed: {e}", self.q.index);
        }
        if !self.shutdown() {
            // Dropping the engine leaks what the kernel may still use (io/engine.rs).
            tracing::error!(
                "queue {}: {} request(s) left in flight",
                self.q.index,
                self.in_flight
            );
        }
        std::mem::take(&mut held(&mut self.ring).queue)
    }

    /// Lets the engine's threads return requests to the driver while this thread sleeps.
    fn lend(&mut self) {
        held(&mut self.ring).lent = true;
        self.ring = None;
    }

    /// Takes the ring back after a sleep (waiting while the engine's thread publishes).
    fn take_back(&mut self) {
        if self.ring.is_none() {
            let mut ring = self.shared.lock_arc();
            ring.lent = false;
            self.ring = Some(ring);
        }
    }

    fn serve(&mut self) -> io::Result<()> {
        self.engine.start()?;
        self.watch_kick()?;
        self.watch_wake()?;
        loop {
            // Submit what the last round queued, and sleep until something happens unless
            // there is work to do already (or polling found some).
            let runnable = self.q.control.enabled() && !self.broken;
            let mut idle_since = None;
            let mut ready = self.ready();
            if runnable && !ready && self.throttled.is_none() {
                idle_since = Some(Instant::now());
                ready = self.idle()?;
            }
            match self.throttled {
                // Over the limits: sleep until a request may start (a completion, a kick that
                // came before kicks went off, or a control request wake it earlier).
                Some(throttled) if runnable => {
                    let left = throttled.until.saturating_duration_since(Instant::now());
                    self.engine.enter_timeout(left)?;
                }
                _ => {
                    let wait = !(runnable && ready);
                    // Only a kick or a control request needs this thread before the next
                    // completion: the engine may complete requests itself (direct.rs).
                    if wait && runnable && self.direct && self.kicks_on && !self.starved {
                        self.lend();
                    }
                    let entered = self.engine.enter(wait);
                    self.take_back();
                    entered?;
                }
            }
            let now = Instant::now();
            if let Some(throttled) = self.throttled {
                if now >= throttled.until {
                    self.throttled = None;
                    // Chains may have come meanwhile, without a kick.
                    self.backlog = true;
                    if let Some(stats) = self.device.stats.get(self.q.index) {
                        stats.record_throttled(now.duration_since(throttled.since));
                    }
                }
            }
            self.pass_start = now;
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
                if !self.q.resubmit.is_empty() {
                    self.resubmit();
                }
                self.process_avail();
            }
            self.notify();
        }
    }

    /// Whether the avail ring has work this thread can take now.
    fn ready(&self) -> bool {
        self.throttled.is_none()
            && (self.backlog || self.kicked || (self.starved && !self.free.is_empty()))
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
            self.engine.enter(false)?;
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
        match held(&mut self.ring)
            .queue
            .enable_notification(memory.memory())
        {
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
            let queue = &held(&mut self.ring).queue;
            match queue.avail_idx(memory.memory(), std::sync::atomic::Ordering::Acquire) {
                Ok(idx) if idx.0 != queue.next_avail() => break Spin::Avail,
                Ok(_) => {}
                // Let the ring code find (and report) what is wrong.
                Err(_) => break Spin::Avail,
            }
            if self.engine.has_events() || self.q.control.stop_requested() {
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

    /// Handles every ready event: completions, kicks, control wakeups. Every event is handled
    /// even if re-arming a watch fails; that error is returned after.
    fn reap(&mut self) -> io::Result<()> {
        self.batch_end = None;
        let mut events = std::mem::take(&mut self.events);
        self.engine.reap(&mut events);
        let mut result = Ok(());
        for event in events.drain(..) {
            let handled = match event {
                Event::Completed(done) => {
                    self.complete(done);
                    Ok(())
                }
                Event::Watch { token: KICK, .. } => {
                    self.kicked = true;
                    if let Some(stats) = self.device.stats.get(self.q.index) {
                        stats.record_kick();
                    }
                    self.watch_kick()
                }
                Event::Watch { token: WAKE, .. } => {
                    // Enabled, stopping or cancelling: look at the ring again either way.
                    self.kicked = true;
                    let rearmed = self.watch_wake();
                    rearmed.and(self.cancel_retiring())
                }
                Event::Watch { .. } => Ok(()),
            };
            if result.is_ok() {
                result = handled;
            }
        }
        self.events = events;
        result
    }

    /// Cancels the requests that pin a region the session is waiting for (memory.md).
    fn cancel_retiring(&mut self) -> io::Result<()> {
        let regions = self.q.control.take_cancels();
        if regions.is_empty() {
            return Ok(());
        }
        self.engine.cancel(&|buffers| buffers.uses_any(&regions))
    }

    /// Takes chains from the avail ring, parses them and starts their I/O, as far as the
    /// export's QoS limits allow. Kicks stay off until the thread is about to sleep (see
    /// `idle`).
    ///
    /// Without limits that costs one flag per batch. With limits, the buckets are looked at
    /// twice per batch, one clock read: what room they have before it, what the batch took
    /// after it (and whether the next request may start, or the thread must wait).
    fn process_avail(&mut self) {
        if !self.device.throttle.limited() {
            return self.take_chains(&mut None);
        }
        let now = Instant::now();
        let mut quota = Some(self.device.throttle.quota(now));
        self.take_chains(&mut quota);
        if let Some(wait) = quota.and_then(|quota| self.device.throttle.settle(&quota, now)) {
            // (The serve loop interrupts for what completed.)
            self.throttled = Some(Throttled {
                since: now,
                until: now + wait.min(THROTTLE_RECHECK),
            });
        }
    }

    /// The loop of [`QueueServer::process_avail`]: takes chains while `quota` (if there are
    /// limits) lets them start, and counts them in it.
    fn take_chains(&mut self, quota: &mut Option<Quota>) {
        // Requests the engine completes inline form a batch of their own.
        self.batch_end = None;
        self.backlog = false;
        self.starved = false;
        let mut generation = self.generation.clone();
        let size = held(&mut self.ring).queue.size();
        if self.kicks_on {
            if let Err(e) = held(&mut self.ring)
                .queue
                .disable_notification(generation.memory())
            {
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
            // A request may start while the buckets are not full (counting what this batch
            // took); the chain stays in the ring otherwise.
            if quota.as_ref().is_some_and(|q| !q.may_start()) {
                return;
            }
            // Each chain is parsed against the newest memory table (the frontend may have
            // replaced it since the last chain), never a retired one.
            let latest = self.q.memory.current();
            if !Arc::ptr_eq(&latest, &generation) {
                generation = latest;
                self.generation = generation.clone();
            }
            let ring = held(&mut self.ring);
            let chain = match ring.queue.iter(generation.memory()) {
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
            if let Some(tracker) = &mut held(&mut self.ring).inflight {
                tracker.taken(head);
            }
            let bytes = self.start_request(head, chain, &generation);
            if let Some(quota) = quota {
                quota.take(bytes);
            }
            self.notify_early();
        }
        // Let completions and other queues have a turn; come back without a kick.
        self.backlog = true;
    }

    /// Runs again the heads a previous backend left in flight (the inflight region's, oldest
    /// first), before anything new from the avail ring: they were taken before all of it.
    fn resubmit(&mut self) {
        let heads = std::mem::take(&mut self.q.resubmit);
        if heads.is_empty() {
            return;
        }
        tracing::info!(
            "queue {}: resubmitting {} request(s) left in flight: heads {heads:?}",
            self.q.index,
            heads.len()
        );
        let generation = self.q.memory.current();
        self.generation = generation.clone();
        let ring = held(&mut self.ring);
        let size = ring.queue.size();
        let table = vm_memory::GuestAddress(ring.queue.desc_table());
        for head in heads {
            let chain = ChainWalk::new(generation.memory(), table, size, head);
            self.start_request(head, chain, &generation);
            let again = self
                .slots
                .iter()
                .find(|s| s.head == head && s.request.is_some());
            tracing::debug!(
                "queue {}: head {head} resubmitted: {:?}",
                self.q.index,
                again
                    .and_then(|s| s.request)
                    .map(|r| (r.kind, r.offset, r.len))
            );
        }
        self.notify();
    }

    /// Like the kernel's vq_err: a driver that corrupts its ring loses the queue until it
    /// resets it; the daemon and every other queue carry on.
    fn mark_broken(&mut self, e: &dyn std::fmt::Display) {
        tracing::error!(
            "queue {}: the driver corrupted the ring ({e}); queue stopped until reset",
            self.q.index
        );
        self.broken = true;
        // The kernel's vq_err signals the error eventfd too: QEMU logs it.
        self.q.err.signal();
    }

    /// Parses a chain, pins its buffers and hands it to the engine; a chain that fails either
    /// is completed at once, with no I/O. Returns the bytes it reads or writes (what the
    /// byte limits count).
    fn start_request(
        &mut self,
        head: u16,
        chain: impl Iterator<Item = virtio_queue::desc::split::Descriptor>,
        generation: &Arc<Generation>,
    ) -> u64 {
        let Some(tag) = self.free.pop() else { return 0 };
        let index = usize::from(tag);
        let slot = &mut self.slots[index];
        let mut raw = slot.spare.take().unwrap_or_default();
        self.limits.capacity = self.device.config.capacity();
        let parsed = request::parse(
            chain,
            generation.memory(),
            &self.limits,
            &mut self.scratch,
            Buffers {
                iovecs: raw.iovecs_mut(),
                segments: &mut slot.segments,
            },
        );
        slot.head = head;
        slot.started = Some(self.pass_start);
        self.in_flight += 1;
        if let Some(stats) = self.device.stats.get(self.q.index) {
            stats.set_in_flight(self.in_flight);
        }
        let status = match &parsed {
            Ok(req) => Some(req.status),
            Err(rejection) => rejection.status,
        };
        let mut buffers = generation.pin(raw, status.map(|s| s.as_ptr()));
        match parsed {
            Ok(req) if buffers.is_complete() => {
                slot.request = Some(req);
                self.submit(tag, req, buffers);
                match req.kind {
                    RequestKind::Read | RequestKind::Write => req.len,
                    _ => 0,
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
                    stats.record_refused(code);
                }
                let written = buffers.write_status(code);
                self.release(index, u32::from(written), buffers, false);
                0
            }
        }
    }

    /// Hands a parsed request to the engine, or completes it here when it needs no I/O.
    fn submit(&mut self, tag: Tag, req: Request, mut buffers: GuestBuffers) {
        let index = usize::from(tag);
        let segments = &self.slots[index].segments;
        let dsync = self.device.config.write_through();
        let operation = match req.kind {
            RequestKind::GetId => {
                // The parser capped the buffers at the serial's 20 bytes.
                buffers.copy_in(&self.device.config.serial);
                return self.finish(index, STATUS_OK, buffers);
            }
            RequestKind::Read => Operation::Read { offset: req.offset },
            RequestKind::Write => Operation::Write {
                offset: req.offset,
                dsync,
            },
            RequestKind::Flush => Operation::Flush,
            RequestKind::Discard => Operation::Discard { segments, dsync },
            RequestKind::WriteZeroes => Operation::WriteZeroes { segments, dsync },
        };
        if self.direct {
            held(&mut self.ring).requests[index] = Publishable {
                head: self.slots[index].head,
                used_len: request::used_len(req.kind, req.len),
                status: buffers.status_byte(),
                published: None,
            };
        }
        if let Some(done) = self.engine.submit(tag, operation, buffers) {
            self.complete(done);
        }
    }

    /// A request the engine finished: its status follows from the result.
    fn complete(&mut self, done: Completion) {
        let index = usize::from(done.tag);
        let Some(req) = self.slots.get(index).and_then(|s| s.request) else {
            tracing::error!(
                "queue {}: completion for unknown request {index}",
                self.q.index
            );
            return;
        };
        if done.published {
            let published = held(&mut self.ring)
                .requests
                .get_mut(index)
                .and_then(|r| r.published.take());
            if let Some(published) = published {
                return self.retire(index, req, published, done.buffers);
            }
            // Not reachable: an engine marks only what it published. Complete it here.
            tracing::error!(
                "queue {}: request {index} reported published, but was not",
                self.q.index
            );
        }
        let status = match &done.result {
            Ok(()) => {
                if done.inline {
                    if let Some(stats) = self.device.stats.get(self.q.index) {
                        stats.record_inline();
                    }
                }
                STATUS_OK
            }
            Err(e) => {
                if e.raw_os_error() == Some(libc::ECANCELED) {
                    self.q
                        .memory
                        .stats()
                        .cancelled
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                self.log_io_error(&req, e);
                STATUS_IOERR
            }
        };
        self.finish(index, status, done.buffers);
    }

    fn log_io_error(&mut self, req: &Request, e: &io::Error) {
        if let Some(suppressed) = self.io_errors.check(Instant::now()) {
            tracing::warn!(
                "queue {}: {:?} at byte {} failed on {}: {e}{}",
                self.q.index,
                req.kind,
                req.offset,
                self.device.disk.name,
                suppressed_note(suppressed)
            );
        }
    }

    /// Writes the status of a request and returns its chain to the driver.
    fn finish(&mut self, index: usize, status: u8, mut buffers: GuestBuffers) {
        let Some(req) = self.slots[index].request else {
            return;
        };
        if let Some(stats) = self.device.stats.get(self.q.index) {
            let end = *self.batch_end.get_or_insert_with(Instant::now);
            let latency = self.slots[index].started.map_or(Duration::ZERO, |started| {
                end.saturating_duration_since(started)
            });
            stats.record(req.kind, req.len, status, latency);
        }
        buffers.write_status(status);
        // The device wrote into the driver's buffers for reads and GET_ID (marked while logging).
        let data = matches!(req.kind, RequestKind::Read | RequestKind::GetId);
        self.release(index, request::used_len(req.kind, req.len), buffers, data);
    }

    /// Finishes a request the engine's thread returned to the driver (direct.rs): its entry
    /// went to used index `at` at `when`.
    fn retire(
        &mut self,
        index: usize,
        req: Request,
        (at, when): (u16, Instant),
        buffers: GuestBuffers,
    ) {
        if let Some(stats) = self.device.stats.get(self.q.index) {
            let latency = self.slots[index].started.map_or(Duration::ZERO, |started| {
                when.saturating_duration_since(started)
            });
            stats.record(req.kind, req.len, STATUS_OK, latency);
        }
        self.done += 1;
        if self.q.log.active() {
            let data = matches!(req.kind, RequestKind::Read | RequestKind::GetId);
            self.log_request(&buffers, data, at);
        }
        self.forget(index, buffers);
    }

    /// Returns a request's chain to the driver (its status written), marks what it wrote in
    /// the dirty log while logging is on (its buffers when `data`), and frees its slot.
    fn release(&mut self, index: usize, used_len: u32, buffers: GuestBuffers, data: bool) {
        let head = self.slots[index].head;
        self.done += 1;
        let ring = held(&mut self.ring);
        if ring.abandoned(&self.q.control) {
            // The frontend is gone: the next backend runs this head again from the region.
            self.forget(index, buffers);
            return;
        }
        let at = ring.add_used(self.generation.memory(), head, used_len, self.q.index);
        self.used_added = true;
        // Checked after every write of the request (dirty_log.rs says why that is enough).
        if self.q.log.active() {
            self.log_request(&buffers, data, at);
        }
        // Status and used entry are written: now the regions may retire and the generation
        // unmap.
        self.forget(index, buffers);
    }

    /// Frees slot `index` and unpins its buffers (the I/O is over).
    fn forget(&mut self, index: usize, buffers: GuestBuffers) {
        let slot = &mut self.slots[index];
        slot.request = None;
        slot.spare = Some(buffers.release());
        self.free.push(index as Tag);
        self.in_flight -= 1;
        if let Some(stats) = self.device.stats.get(self.q.index) {
            stats.set_in_flight(self.in_flight);
        }
    }

    /// Marks a released request's writes in the dirty log: its status byte, its buffers if the
    /// device wrote them, its used entry (written at used index `at`) and the used index.
    #[cold]
    fn log_request(&mut self, buffers: &GuestBuffers, data: bool, at: u16) {
        let Some(map) = self.q.log.map() else { return };
        let mut inside = buffers.mark_dirty(&map, data);
        if let Some(used) = self.q.control.used_log() {
            let slot = at % held(&mut self.ring).queue.size();
            let entry = used.wrapping_add(USED_RING_OFFSET + USED_ELEM_SIZE * u64::from(slot));
            inside &= map.mark(entry, USED_ELEM_SIZE);
            inside &= map.mark(used.wrapping_add(USED_IDX_OFFSET), 2);
        }
        if !inside && self.q.log.note_missed() {
            tracing::warn!(
                "queue {}: the guest wrote memory beyond the dirty log; the frontend's log is \
                 too small for its memory",
                self.q.index
            );
        }
    }

    /// Marks the whole used ring (flags, entries, index, avail_event) while logging is on: when
    /// the ring stops, so the notification fields the thread wrote are covered too.
    fn log_used_ring(&mut self) {
        if !self.q.log.active() {
            return;
        }
        let (Some(map), Some(used)) = (self.q.log.map(), self.q.control.used_log()) else {
            return;
        };
        let size = held(&mut self.ring).queue.size();
        let len = USED_RING_OFFSET + USED_ELEM_SIZE * u64::from(size) + 2;
        if !map.mark(used, len) && self.q.log.note_missed() {
            tracing::warn!(
                "queue {}: the used ring lies beyond the dirty log",
                self.q.index
            );
        }
    }

    /// Interrupts now, mid-batch, if the driver wants one and EVENT_IDX keeps that to one
    /// per wait of the driver (see the module comment).
    fn notify_early(&mut self) {
        if held(&mut self.ring).queue.event_idx_enabled() {
            self.notify();
        }
    }

    /// One interrupt for everything completed since the last, if the driver wants one.
    fn notify(&mut self) {
        if !std::mem::take(&mut self.used_added) {
            return;
        }
        let stats = self.device.stats.get(self.q.index);
        held(&mut self.ring).notify(self.generation.memory(), &self.q.call, stats);
    }

    /// Completes everything in flight, then cancels the watches, so the engine holds nothing
    /// the kernel may use when it is dropped. `false` if the engine failed and that cannot be
    /// known.
    fn shutdown(&mut self) -> bool {
        let mut outstanding_watches = 2;
        for token in [KICK, WAKE] {
            if self.engine.unwatch(token).is_err() {
                break;
            }
        }
        // Requests get the device's bound to complete; then they are cancelled, and the
        // cancellations are waited for: nothing may write guest memory after this returns.
        let bound = self.device.retire_timeout;
        let start = Instant::now();
        let mut cancelled = false;
        while self.in_flight > 0 || outstanding_watches > 0 {
            let entered = if cancelled {
                self.engine.enter(true).map(|()| true)
            } else {
                let left = bound
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1));
                self.engine.enter_timeout(left)
            };
            match entered {
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
                        if let Err(e) = self.engine.cancel(&|_| true) {
                            tracing::error!("queue {}: cannot cancel: {e}", self.q.index);
                        }
                    }
                    continue;
                }
                Err(e) => {
                    tracing::error!("queue {}: cannot drain the engine: {e}", self.q.index);
                    return false;
                }
            }
            self.generation = self.q.memory.current();
            self.batch_end = None;
            let mut events = std::mem::take(&mut self.events);
            self.engine.reap(&mut events);
            for event in events.drain(..) {
                match event {
                    Event::Watch {
                        token: KICK | WAKE, ..
                    } => outstanding_watches -= 1,
                    Event::Watch { .. } => {}
                    Event::Completed(done) => self.complete(done),
                }
            }
            self.events = events;
        }
        self.notify();
        self.log_used_ring();
        true
    }
}

fn suppressed_note(suppressed: u64) -> String {
    if suppressed == 0 {
        String::new()
    } else {
        format!(" ({suppressed} similar messages suppressed)")
    }
}

#[cfg(test)]
#[path = "queue_tests.rs"]
mod tests;
