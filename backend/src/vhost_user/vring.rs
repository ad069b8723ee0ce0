//! One vring: what the frontend configured for it, and the thread that serves it once started.
//!
//! Ring states follow the vhost-user spec: a ring starts when it has a kick fd (and addresses),
//! stops on GET_VRING_BASE, and between the two is enabled or disabled by SET_VRING_ENABLE.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dirty_log::DirtyLog;
use super::inflight::Tracker;
use super::memory::{GuestMemoryHandle, RegionPin};

/// No used-ring log address (`QueueControl::used_log`).
const NO_LOG: u64 = u64::MAX;

/// An eventfd the frontend gave a ring to be signalled on — its call eventfd (SET_VRING_CALL)
/// or its error eventfd (SET_VRING_ERR) — replaceable while the ring runs (SET_VRING_CALL may
/// come at any time, e.g. when the frontend masks interrupts).
#[derive(Default)]
pub struct CallFd(Mutex<Option<EventFd>>);

impl CallFd {
    /// Interrupts the driver (the call eventfd), or tells the frontend the ring failed (the
    /// error eventfd).
    pub fn signal(&self) {
        if let Some(fd) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            // A full counter means the frontend has a notification pending already.
            let _ = fd.write(1);
        }
    }

    pub(crate) fn set(&self, fd: Option<EventFd>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }
}

/// How the session talks to a running queue thread: flags, and an eventfd to wake it.
pub struct QueueControl {
    wake: EventFd,
    stop: AtomicBool,
    /// The frontend went away and keeps an inflight region: requests still in flight finish
    /// their I/O but are not returned to the ring, which the next backend rebuilds from the
    /// region (a late used entry would complete a head the next backend runs again).
    abandon: AtomicBool,
    enabled: AtomicBool,
    /// Regions whose in-flight requests the thread must cancel.
    cancel: Mutex<Vec<Arc<RegionPin>>>,
    /// Where writes to the used ring are logged (SET_VRING_ADDR with VHOST_VRING_F_LOG), or
    /// [`NO_LOG`]. Changes while the ring runs: QEMU sets it when a migration starts.
    used_log: AtomicU64,
}

impl QueueControl {
    pub(crate) fn new(enabled: bool) -> io::Result<QueueControl> {
        Ok(QueueControl {
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            enabled: AtomicBool::new(enabled),
            cancel: Mutex::new(Vec::new()),
            used_log: AtomicU64::new(NO_LOG),
        })
    }

    /// The guest address the used ring's writes are logged at, if the frontend asked for it.
    pub fn used_log(&self) -> Option<u64> {
        Some(self.used_log.load(Ordering::Relaxed)).filter(|&a| a != NO_LOG)
    }

    pub(crate) fn set_used_log(&self, addr: Option<u64>) {
        self.used_log
            .store(addr.unwrap_or(NO_LOG), Ordering::Relaxed);
    }

    /// The eventfd the queue thread must watch; readable after any change.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    pub fn stop_requested(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Regions whose requests the session wants cancelled (taken once).
    pub fn take_cancels(&self) -> Vec<Arc<RegionPin>> {
        std::mem::take(&mut *self.cancel.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Asks the thread to cancel its requests that pin any of `pins`.
    pub(crate) fn request_cancel(&self, pins: &[Arc<RegionPin>]) {
        self.cancel
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pins.iter().cloned());
        let _ = self.wake.write(1);
    }

    /// Whether the ring was abandoned (see the field): its thread returns nothing more to it.
    pub fn abandoned(&self) -> bool {
        self.abandon.load(Ordering::Acquire)
    }

    fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    fn set_enabled(&self, enabled: bool) {
        self.enabled.store(enabled, Ordering::Release);
        let _ = self.wake.write(1);
    }
}

/// Everything a queue thread owns while it serves one ring.
pub struct RunningQueue {
    pub index: usize,
    pub queue: Queue,
    pub kick: EventFd,
    pub call: Arc<CallFd>,
    /// Signalled when the driver corrupted the ring (the kernel's `vq_err`).
    pub err: Arc<CallFd>,
    pub control: Arc<QueueControl>,
    pub memory: GuestMemoryHandle,
    /// The session's dirty log: what the thread writes is marked in it while logging is on.
    pub log: DirtyLog,
    /// The ring's inflight region, when the frontend gave one (inflight.rs).
    pub inflight: Option<Tracker>,
    /// Heads a previous backend left in flight, to run again first, oldest first.
    pub resubmit: Vec<u16>,
}

struct Started {
    control: Arc<QueueControl>,
    thread: JoinHandle<Queue>,
}

/// The session's view of one ring.
pub(super) struct Vring {
    pub size: u16,
    pub desc: Option<GuestAddress>,
    pub avail: Option<GuestAddress>,
    pub used: Option<GuestAddress>,
    /// The next avail index to serve, as SET_VRING_BASE gave it (or the last stop left it).
    pub base: u16,
    pub kick: Option<EventFd>,
    pub call: Arc<CallFd>,
    pub err: Arc<CallFd>,
    pub enabled: bool,
    /// The used ring's log address (SET_VRING_ADDR with VHOST_VRING_F_LOG).
    used_log: Option<u64>,
    /// What the inflight region gave for the next start: its tracker and the heads to run
    /// again (inflight.rs).
    pub recovered: Option<(Tracker, Vec<u16>)>,
    started: Option<Started>,
}

impl Vring {
    pub fn new(max_size: u16) -> Vring {
        Vring {
            size: max_size,
            desc: None,
            avail: None,
            used: None,
            base: 0,
            kick: None,
            call: Arc::new(CallFd::default()),
            err: Arc::new(CallFd::default()),
            enabled: false,
            used_log: None,
            recovered: None,
            started: None,
        }
    }

    /// Where the used ring's writes are logged from now on (`None`: not logged).
    pub fn set_used_log(&mut self, addr: Option<u64>) {
        self.used_log = addr;
        if let Some(started) = &self.started {
            started.control.set_used_log(addr);
        }
    }

    pub fn is_started(&self) -> bool {
        self.started.is_some()
    }

    pub fn set_call(&self, fd: Option<EventFd>) {
        self.call.set(fd);
    }

    pub fn set_err(&self, fd: Option<EventFd>) {
        self.err.set(fd);
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if let Some(started) = &self.started {
            started.control.set_enabled(enabled);
        }
    }

    /// Starts the queue thread: `spawn` prepares the device's queue loop and runs it on a new
    /// thread.
    pub fn start(
        &mut self,
        queue: Queue,
        kick: EventFd,
        index: usize,
        memory: GuestMemoryHandle,
        log: DirtyLog,
        spawn: impl FnOnce(RunningQueue) -> io::Result<JoinHandle<Queue>>,
    ) -> io::Result<()> {
        let (inflight, resubmit) = match self.recovered.take() {
            Some((tracker, resubmit)) => (Some(tracker), resubmit),
            None => (None, Vec::new()),
        };
        let control = Arc::new(QueueControl::new(self.enabled)?);
        control.set_used_log(self.used_log);
        let thread = spawn(RunningQueue {
            index,
            queue,
            kick,
            call: self.call.clone(),
            err: self.err.clone(),
            control: control.clone(),
            memory,
            log,
            inflight,
            resubmit,
        })?;
        self.started = Some(Started { control, thread });
        Ok(())
    }

    /// Asks the queue thread to cancel its requests that pin any of `pins`.
    pub fn cancel(&self, pins: &[Arc<RegionPin>]) {
        if let Some(started) = &self.started {
            started.control.request_cancel(pins);
        }
    }

    /// Asks the queue thread to stop without returning anything more to the ring (the
    /// frontend is gone; its inflight region says what runs again); [`Vring::stop`] waits.
    pub fn begin_abandon(&self) {
        if let Some(started) = &self.started {
            started.control.abandon.store(true, Ordering::Release);
            started.control.request_stop();
        }
    }

    /// Asks the queue thread to stop; [`Vring::stop`] waits for it.
    pub fn begin_stop(&self) {
        if let Some(started) = &self.started {
            started.control.request_stop();
        }
    }

    /// Stops the ring (GET_VRING_BASE, disconnect): stops its thread ([`Vring::stop_thread`])
    /// and forgets its eventfds, which the frontend sends again before it starts the ring
    /// again. Returns the next avail index.
    pub fn stop(&mut self) -> u16 {
        self.stop_thread();
        self.kick = None;
        self.set_call(None);
        self.set_err(None);
        self.base
    }

    /// Stops the queue thread, which completes what it has in flight first (or cancels it
    /// past the device's bound), and remembers where the ring stands; the eventfds stay (a
    /// new kick fd restarts the ring with the call and error fds it had).
    pub fn stop_thread(&mut self) {
        if let Some(started) = self.started.take() {
            started.control.request_stop();
            match started.thread.join() {
                Ok(queue) => self.base = queue.next_avail(),
                Err(_) => tracing::error!("queue thread panicked; ring position lost"),
            }
        }
    }
}
