//! A vhost-user frontend session: one connection, its guest memory and its vrings.
//!
//! The handshake is a list of [`Step`]s, one per vhost-user message (plus the `NeedReply`
//! switch), so a test can replay a VMM's exact sequence ([`Step::qemu`],
//! [`Step::cloud_hypervisor`], and the cited one in [`super::cloud_hypervisor`]), reorder it, or
//! stop half-way. Each step goes through the `vhost` crate's [`Frontend`]; anything the steps do
//! not cover is reachable through [`Session::frontend`]. [`Session::reconnect`] puts the same
//! guest (memory, vrings, eventfds) on a new connection, as a VMM does after its backend went
//! away.
//!
//! ```text
//! mod.rs           the session: connect, reconnect, hang-up; what it holds
//! config.rs        what the frontend offers (features, protocol features) and builds (memory, queues)
//! handshake.rs     the steps: features, protocol features, queue number, device config, owner
//! memory_table.rs  announcing guest memory; plugging and unplugging regions
//! vrings.rs        the vrings: setting up, submitting chains, waiting for used elements and calls
//! background.rs    a message sent from another thread, to watch the backend before it replies
//! watchdog.rs      a step that takes too long shuts the connection down instead of hanging
//! ```

mod backend_channel;
mod background;
mod config;
mod handshake;
mod memory_table;
mod vrings;
mod watchdog;

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::Frontend;

pub use backend_channel::{BackendRequest, CONFIG_CHANGE_MSG};
pub use background::{PendingReply, Reply};
pub use config::{SessionConfig, DRIVER_FEATURES};
pub use handshake::{Step, BLK_CONFIG_LEN};
pub use memory_table::{MemAnnounce, Replacement};
pub use vrings::Vring;

use super::memory::{Arena, GuestMemory, MemoryError};
use super::virtqueue::{QueueError, SplitQueue};
use watchdog::Watchdog;

/// Session failures.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("vhost-user {step} failed")]
    Vhost {
        step: String,
        #[source]
        source: vhost::Error,
    },
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("vhost-user {step}: no reply within {waited:?}; the connection was shut down")]
    NoReply { step: String, waited: Duration },
    #[error("cannot configure the vhost-user socket")]
    Socket(#[source] std::io::Error),
    #[error("cannot create or use an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("queue {0} does not exist in this session")]
    NoQueue(usize),
    #[error("queue {queue}: nothing in the used ring after {waited:?}")]
    Timeout { queue: usize, waited: Duration },
    #[error("queue {queue}: head {head} was not returned within {waited:?}")]
    HeadTimeout {
        queue: usize,
        head: u16,
        waited: Duration,
    },
}

/// One frontend connection.
pub struct Session {
    frontend: Frontend,
    config: SessionConfig,
    mem: GuestMemory,
    arena: Arena,
    vrings: Vec<Vring>,
    backend_features: u64,
    acked_features: u64,
    backend_protocol_features: VhostUserProtocolFeatures,
    acked_protocol_features: VhostUserProtocolFeatures,
    queue_num: Option<u64>,
    max_mem_slots: Option<u64>,
    last_config: Option<Vec<u8>>,
    last_vring_base: Option<u32>,
    sent: Vec<Step>,
    watchdog: Option<Watchdog>,
    /// A second handle on the socket, to shut it down under a message sent in the background.
    socket: UnixStream,
    /// NEED_REPLY is set on every message (after [`Step::NeedReply`]).
    need_reply_always: bool,
    /// The inflight region the backend gave ([`Step::Inflight`]), kept across reconnects.
    inflight: Option<(vhost::vhost_user::message::VhostUserInflight, std::fs::File)>,
    /// Our end of the backend request channel ([`Session::open_backend_channel`]).
    backend_channel: Option<UnixStream>,
}

impl Session {
    /// Wraps a connected stream; creates guest memory and the vrings; sends nothing.
    pub fn new(stream: UnixStream, config: SessionConfig) -> Result<Self, SessionError> {
        let mem = if config.shared_memfd {
            GuestMemory::with_shared_file(&config.memory)?
        } else {
            GuestMemory::new(&config.memory)?
        };
        let first = *config
            .memory
            .iter()
            .min_by_key(|r| r.guest_addr)
            .ok_or(MemoryError::NoRegion(0))?;
        let mut arena = Arena::over(first);
        let mut vrings = Vec::with_capacity(config.num_queues);
        for _ in 0..config.num_queues {
            vrings.push(Vring::new(SplitQueue::new(
                &mem,
                &mut arena,
                config.queue_size,
            )?)?);
        }
        let watchdog = match config.reply_timeout {
            Some(t) => Some(Watchdog::new(
                stream.try_clone().map_err(SessionError::Socket)?,
                t,
            )),
            None => None,
        };
        let socket = stream.try_clone().map_err(SessionError::Socket)?;
        let frontend = Frontend::from_stream(stream, config.num_queues.max(1) as u64);
        Ok(Self {
            socket,
            frontend,
            config,
            mem,
            arena,
            vrings,
            backend_features: 0,
            acked_features: 0,
            backend_protocol_features: VhostUserProtocolFeatures::empty(),
            acked_protocol_features: VhostUserProtocolFeatures::empty(),
            queue_num: None,
            max_mem_slots: None,
            last_config: None,
            last_vring_base: None,
            sent: Vec::new(),
            watchdog,
            need_reply_always: false,
            inflight: None,
            backend_channel: None,
        })
    }

    /// Moves this guest to a new connection, as a VMM does when its backend went away and came
    /// back (or it reconnected on purpose): guest memory, the vrings (their rings, indexes and
    /// eventfds) and the buffers in them stay; what was negotiated on the old connection is
    /// forgotten, and nothing is sent. The old connection is closed.
    pub fn reconnect(&mut self, stream: UnixStream) -> Result<(), SessionError> {
        let watchdog = match self.config.reply_timeout {
            Some(t) => Some(Watchdog::new(
                stream.try_clone().map_err(SessionError::Socket)?,
                t,
            )),
            None => None,
        };
        let socket = stream.try_clone().map_err(SessionError::Socket)?;
        let frontend = Frontend::from_stream(stream, self.config.num_queues.max(1) as u64);
        let _ = self.socket.shutdown(Shutdown::Both);
        self.frontend = frontend;
        self.socket = socket;
        self.watchdog = watchdog;
        self.backend_features = 0;
        self.acked_features = 0;
        self.backend_protocol_features = VhostUserProtocolFeatures::empty();
        self.acked_protocol_features = VhostUserProtocolFeatures::empty();
        self.queue_num = None;
        self.max_mem_slots = None;
        self.last_config = None;
        self.last_vring_base = None;
        self.need_reply_always = false;
        for vr in &mut self.vrings {
            // Completions already taken from the used ring stay the test's; signals on the
            // call eventfd that nobody read belong to the old connection.
            let _ = vr.call.read();
        }
        Ok(())
    }

    /// `new` followed by `steps`.
    pub fn connect(
        stream: UnixStream,
        config: SessionConfig,
        steps: &[Step],
    ) -> Result<Self, SessionError> {
        let mut s = Self::new(stream, config)?;
        s.run(steps)?;
        Ok(s)
    }

    /// The `vhost` crate frontend, for messages the steps do not cover.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// Guest memory.
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// The allocator over the first region, after the vrings.
    pub fn arena(&mut self) -> &mut Arena {
        &mut self.arena
    }

    /// Guest memory and the arena at once (to allocate and write in one go).
    pub fn mem_and_arena(&mut self) -> (&GuestMemory, &mut Arena) {
        (&self.mem, &mut self.arena)
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Waits up to `timeout` for the backend to hang up the connection (what a VMM watches for
    /// to reconnect: cloud-hypervisor polls its socket for EPOLLHUP). Returns whether it did.
    pub fn wait_hangup(&self, timeout: Duration) -> Result<bool, SessionError> {
        let start = Instant::now();
        loop {
            let mut fds = [PollFd::new(&self.socket, PollFlags::HUP | PollFlags::RDHUP)];
            let left = timeout.saturating_sub(start.elapsed());
            let ts = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(SessionError::Socket(e.into())),
            }
            let ev = fds[0].revents();
            if ev.intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR) {
                return Ok(true);
            }
            if start.elapsed() >= timeout {
                return Ok(false);
            }
        }
    }

    /// Closes the connection (the backend sees EOF).
    pub fn close(self) {
        drop(self);
    }
}
