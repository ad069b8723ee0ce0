//! One vring: what the frontend configured for it, and the thread that serves it once started.
//!
//! Ring states follow the vhost-user spec: a ring starts when it has a kick fd (and addresses),
//! stops on GET_VRING_BASE, and between the two is enabled or disabled by SET_VRING_ENABLE.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::inflight::Tracker;
use super::memory::{GuestMemoryHandle, RegionPin};

/// The call eventfd of a ring, replaceable while the ring runs (SET_VRING_CALL may come at any
/// time, e.g. when the frontend masks interrupts).
#[derive(Default)]
pub struct CallFd(Mutex<Option<EventFd>>);

impl CallFd {
    /// Interrupts the driver.
    pub fn signal(&self) {
        if let Some(fd) = self.0.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            // A full counter means the frontend has a notification pending already.
            let _ = fd.write(1);
        }
    }

    fn set(&self, fd: Option<EventFd>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = fd;
    }
}

/// How the session talks to a running queue thread: flags, and an eventfd to wake it.
pub struct QueueControl {
    wake: EventFd,
    stop: AtomicBool,
    enabled: AtomicBool,
    /// Regions whose in-flight requests the thread must cancel.
    cancel: Mutex<Vec<Arc<RegionPin>>>,
}

impl QueueControl {
    pub(crate) fn new(enabled: bool) -> io::Result<QueueControl> {
        Ok(QueueControl {
            wake: EventFd::new(EFD_NONBLOCK)?,
            stop: AtomicBool::new(false),
            enabled: AtomicBool::new(enabled),
            cancel: Mutex::new(Vec::new()),
        })
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
    pub control: Arc<QueueControl>,
    pub memory: GuestMemoryHandle,
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
    pub enabled: bool,
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
            enabled: false,
            started: None,
        }
    }

    pub fn is_started(&self) -> bool {
        self.started.is_some()
    }

    pub fn set_call(&self, fd: Option<EventFd>) {
        self.call.set(fd);
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
        inflight: Option<(Tracker, Vec<u16>)>,
        spawn: impl FnOnce(RunningQueue) -> io::Result<JoinHandle<Queue>>,
    ) -> io::Result<()> {
        let (inflight, resubmit) = match inflight {
            Some((tracker, resubmit)) => (Some(tracker), resubmit),
            None => (None, Vec::new()),
        };
        let control = Arc::new(QueueControl::new(self.enabled)?);
        let thread = spawn(RunningQueue {
            index,
            queue,
            kick,
            call: self.call.clone(),
            control: control.clone(),
            memory,
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

    /// Asks the queue thread to stop; [`Vring::stop`] waits for it.
    pub fn begin_stop(&self) {
        if let Some(started) = &self.started {
            started.control.request_stop();
        }
    }

    /// Stops the queue thread, which completes what it has in flight first (or cancels it
    /// past the device's bound), and remembers where the ring stands. Returns the next avail
    /// index.
    pub fn stop(&mut self) -> u16 {
        if let Some(started) = self.started.take() {
            started.control.request_stop();
            match started.thread.join() {
                Ok(queue) => self.base = queue.next_avail(),
                Err(_) => tracing::error!("queue thread panicked; ring position lost"),
            }
        }
        self.kick = None;
        self.set_call(None);
        self.base
    }
}
