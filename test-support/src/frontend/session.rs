//! A vhost-user frontend session: one connection, its guest memory and its vrings.
//!
//! The handshake is a list of [`Step`]s, one per vhost-user message (plus the `NeedReply`
//! switch), so a test can replay a VMM's exact sequence ([`Step::qemu`],
//! [`Step::cloud_hypervisor`], and the cited one in [`super::cloud_hypervisor`]), reorder it, or
//! stop half-way. Each step goes through the `vhost` crate's [`Frontend`]; anything the steps do
//! not cover is reachable through [`Session::frontend`]. [`Session::reconnect`] puts the same
//! guest (memory, vrings, eventfds) on a new connection, as a VMM does after its backend went
//! away.

use std::collections::VecDeque;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_config::{VIRTIO_F_ANY_LAYOUT, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::memory::{Arena, GuestMemory, MemoryError, RegionSpec, RemovedRegion};
use super::virtqueue::{QueueError, Seg, SplitQueue, UsedElem};

/// Size of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding: what QEMU
/// and cloud-hypervisor ask for.
pub const BLK_CONFIG_LEN: u32 = 60;

/// Virtio features this frontend's driver can honour: every device-specific bit (0..=23),
/// indirect descriptors, event index, VERSION_1, ANY_LAYOUT and vhost-user's PROTOCOL_FEATURES.
/// Not PACKED, IN_ORDER, ACCESS_PLATFORM and friends, which the driver does not implement.
pub const DRIVER_FEATURES: u64 = 0x00ff_ffff
    | (1 << VIRTIO_F_ANY_LAYOUT)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_F_VERSION_1)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

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

/// How guest memory is announced to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemAnnounce {
    /// One SET_MEM_TABLE with every region.
    SetMemTable,
    /// One ADD_MEM_REG per region (needs CONFIGURE_MEM_SLOTS).
    AddMemReg,
}

/// What the frontend offers and builds.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Vrings set up by the vring steps (and created in guest memory).
    pub num_queues: usize,
    /// Entries per vring.
    pub queue_size: u16,
    /// Guest RAM layout.
    pub memory: Vec<RegionSpec>,
    /// Back all regions with one memfd at consecutive offsets (exercises `mmap_offset`).
    pub shared_memfd: bool,
    /// Virtio features the frontend acks if offered.
    pub features: u64,
    /// Protocol features the frontend acks if offered.
    pub protocol_features: VhostUserProtocolFeatures,
    /// How long one step may take before the frontend gives up: the socket is shut down so the
    /// step fails instead of hanging (a backend that never answers must fail a test, not hang
    /// it). `None` waits forever.
    pub reply_timeout: Option<Duration>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            num_queues: 1,
            queue_size: 128,
            memory: vec![RegionSpec::new(0, 16 << 20)],
            shared_memfd: false,
            features: DRIVER_FEATURES,
            protocol_features: VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
            reply_timeout: Some(Duration::from_secs(10)),
        }
    }
}

/// One frontend action; almost all are exactly one vhost-user message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    SetOwner,
    ResetOwner,
    GetFeatures,
    /// SET_FEATURES with `offered & config.features`.
    SetFeatures,
    /// SET_FEATURES with exactly these bits.
    SetFeaturesRaw(u64),
    GetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES with `offered & config.protocol_features`.
    SetProtocolFeatures,
    /// SET_PROTOCOL_FEATURES with exactly these bits (no GET_PROTOCOL_FEATURES needed first:
    /// cloud-hypervisor re-sends what it acked before when it reconnects).
    SetProtocolFeaturesRaw(VhostUserProtocolFeatures),
    /// No message: from now on every request carries NEED_REPLY if REPLY_ACK was acked
    /// (cloud-hypervisor does this right after negotiation).
    NeedReply,
    GetQueueNum,
    GetMaxMemSlots,
    GetConfig {
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    },
    /// SET_CONFIG of `data` at `offset` (the driver writing a config field).
    SetConfig {
        offset: u32,
        data: Vec<u8>,
        flags: VhostUserConfigFlags,
    },
    /// Announce all current regions the given way.
    Memory(MemAnnounce),
    /// Announce memory as ADD_MEM_REG if CONFIGURE_MEM_SLOTS was acked, else SET_MEM_TABLE.
    MemoryPreferSlots,
    SetVringNum(usize),
    /// SET_VRING_BASE with the driver's current avail index.
    SetVringBase(usize),
    SetVringAddr(usize),
    SetVringKick(usize),
    SetVringCall(usize),
    SetVringErr(usize),
    SetVringEnable(usize, bool),
    GetVringBase(usize),
    /// The inner step with NEED_REPLY set on its message if REPLY_ACK was acked, the way QEMU
    /// flags SET_MEM_TABLE: the frontend waits until the backend has applied it.
    WithReply(Box<Step>),
}

impl Step {
    /// Roughly QEMU 8-10's vhost-user-blk: realize (vhost_dev_init, config read at offset 0),
    /// then vhost_dev_start. Only SET_MEM_TABLE asks for a reply, as in QEMU.
    pub fn qemu(num_queues: usize) -> Vec<Step> {
        let mut v = vec![
            Step::GetFeatures,
            Step::GetProtocolFeatures,
            Step::SetProtocolFeatures,
            Step::GetQueueNum,
            Step::GetMaxMemSlots,
            Step::SetOwner,
            Step::GetFeatures,
            Step::GetConfig {
                offset: 0,
                size: BLK_CONFIG_LEN,
                flags: VhostUserConfigFlags::empty(),
            },
            Step::SetFeatures,
            Step::WithReply(Box::new(Step::Memory(MemAnnounce::SetMemTable))),
        ];
        for q in 0..num_queues {
            v.extend([
                Step::SetVringNum(q),
                Step::SetVringBase(q),
                Step::SetVringAddr(q),
                Step::SetVringKick(q),
                Step::SetVringCall(q),
            ]);
        }
        v.extend((0..num_queues).map(|q| Step::SetVringEnable(q, true)));
        v
    }

    /// cloud-hypervisor's vhost-user-blk: `Blk::new` (negotiate_features_vhost_user, queue
    /// number, GET_CONFIG at VHOST_USER_CONFIG_OFFSET with WRITABLE), then activate
    /// (setup_vhost_user: SET_FEATURES, memory, all SET_VRING_NUMs, then per queue ADDR, BASE,
    /// CALL, KICK, then all SET_VRING_ENABLEs). Every message after negotiation asks for a reply.
    /// The same as [`Step::cloud_hypervisor_v51`], where the source it follows is cited.
    pub fn cloud_hypervisor(num_queues: usize) -> Vec<Step> {
        Step::cloud_hypervisor_v51(num_queues)
    }

    /// Negotiation only: features, protocol features, queue number, NEED_REPLY.
    pub fn negotiate() -> Vec<Step> {
        vec![
            Step::SetOwner,
            Step::GetFeatures,
            Step::GetProtocolFeatures,
            Step::SetProtocolFeatures,
            Step::NeedReply,
            Step::GetQueueNum,
        ]
    }

    /// Everything after negotiation needed to start all queues, announcing memory `how`.
    pub fn start(num_queues: usize, how: MemAnnounce) -> Vec<Step> {
        let mut v = vec![Step::SetFeatures, Step::Memory(how)];
        for q in 0..num_queues {
            v.extend([
                Step::SetVringNum(q),
                Step::SetVringBase(q),
                Step::SetVringAddr(q),
                Step::SetVringKick(q),
                Step::SetVringCall(q),
            ]);
        }
        v.extend((0..num_queues).map(|q| Step::SetVringEnable(q, true)));
        v
    }
}

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
    fn new(queue: SplitQueue) -> Result<Self, SessionError> {
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

    /// Runs `steps` in order, stopping at the first failure.
    pub fn run(&mut self, steps: &[Step]) -> Result<(), SessionError> {
        steps.iter().try_for_each(|s| self.step(s))
    }

    /// Runs one step.
    pub fn step(&mut self, step: &Step) -> Result<(), SessionError> {
        self.guarded(&format!("{step:?}"), |s| s.step_inner(step))
    }

    /// Runs `f` under the reply watchdog: if it takes longer than the reply timeout, the socket
    /// is shut down and `f` fails instead of hanging.
    fn guarded<T>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        if let Some(w) = &self.watchdog {
            w.arm();
        }
        let r = f(self);
        if let Some(w) = &self.watchdog {
            if w.disarm() {
                return Err(SessionError::NoReply {
                    step: what.to_string(),
                    waited: w.timeout,
                });
            }
        }
        r
    }

    fn step_inner(&mut self, step: &Step) -> Result<(), SessionError> {
        let fail = |source: vhost::Error| SessionError::Vhost {
            step: format!("{step:?}"),
            source,
        };
        match *step {
            Step::SetOwner => self.frontend.set_owner().map_err(fail)?,
            Step::ResetOwner => self.frontend.reset_owner().map_err(fail)?,
            Step::GetFeatures => {
                self.backend_features = self.frontend.get_features().map_err(fail)?
            }
            Step::SetFeatures => {
                let acked = self.backend_features & self.config.features;
                self.frontend.set_features(acked).map_err(fail)?;
                self.acked_features = acked;
            }
            Step::SetFeaturesRaw(bits) => {
                self.frontend.set_features(bits).map_err(fail)?;
                self.acked_features = bits;
            }
            Step::GetProtocolFeatures => {
                self.backend_protocol_features =
                    self.frontend.get_protocol_features().map_err(fail)?;
            }
            Step::SetProtocolFeatures => {
                let acked = self.backend_protocol_features & self.config.protocol_features;
                self.frontend.set_protocol_features(acked).map_err(fail)?;
                self.acked_protocol_features = acked;
            }
            Step::SetProtocolFeaturesRaw(bits) => {
                self.frontend.set_protocol_features(bits).map_err(fail)?;
                self.acked_protocol_features = bits;
            }
            Step::NeedReply => {
                if self.reply_ack() {
                    self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                    self.need_reply_always = true;
                }
            }
            Step::GetQueueNum => {
                self.queue_num = Some(self.frontend.get_queue_num().map_err(fail)?)
            }
            Step::GetMaxMemSlots => {
                self.max_mem_slots = Some(self.frontend.get_max_mem_slots().map_err(fail)?)
            }
            Step::GetConfig {
                offset,
                size,
                flags,
            } => {
                let buf = vec![0u8; size as usize];
                let (_, payload) = self
                    .frontend
                    .get_config(offset, size, flags, &buf)
                    .map_err(fail)?;
                self.last_config = Some(payload);
            }
            Step::SetConfig {
                offset,
                ref data,
                flags,
            } => self
                .frontend
                .set_config(offset, flags, data)
                .map_err(fail)?,
            Step::Memory(how) => self.announce_memory(how).map_err(|e| match e {
                SessionError::Vhost { source, .. } => fail(source),
                other => other,
            })?,
            Step::MemoryPreferSlots => {
                let how = if self
                    .acked_protocol_features
                    .contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
                {
                    MemAnnounce::AddMemReg
                } else {
                    MemAnnounce::SetMemTable
                };
                self.step_inner(&Step::Memory(how))?;
                return Ok(());
            }
            Step::SetVringNum(q) => {
                let size = self.vring(q)?.queue.size();
                self.frontend.set_vring_num(q, size).map_err(fail)?;
            }
            Step::SetVringBase(q) => {
                let base = self.vring(q)?.queue.avail_idx();
                self.frontend.set_vring_base(q, base).map_err(fail)?;
            }
            Step::SetVringAddr(q) => {
                let data = self.vring(q)?.queue.config_data(&self.mem)?;
                self.frontend.set_vring_addr(q, &data).map_err(fail)?;
            }
            Step::SetVringKick(q) => {
                let vr = self.vrings.get(q).ok_or(SessionError::NoQueue(q))?;
                self.frontend.set_vring_kick(q, &vr.kick).map_err(fail)?;
            }
            Step::SetVringCall(q) => {
                let vr = self.vrings.get(q).ok_or(SessionError::NoQueue(q))?;
                self.frontend.set_vring_call(q, &vr.call).map_err(fail)?;
            }
            Step::SetVringErr(q) => {
                let vr = self.vrings.get(q).ok_or(SessionError::NoQueue(q))?;
                self.frontend.set_vring_err(q, &vr.err).map_err(fail)?;
            }
            Step::SetVringEnable(q, on) => self.frontend.set_vring_enable(q, on).map_err(fail)?,
            Step::GetVringBase(q) => {
                self.last_vring_base = Some(self.frontend.get_vring_base(q).map_err(fail)?)
            }
            Step::WithReply(ref inner) => {
                self.with_reply(|s| s.step_inner(inner))?;
                return Ok(());
            }
        }
        self.sent.push(step.clone());
        Ok(())
    }

    fn reply_ack(&self) -> bool {
        self.acked_protocol_features
            .contains(VhostUserProtocolFeatures::REPLY_ACK)
    }

    /// Runs `f` with NEED_REPLY on every message it sends (if REPLY_ACK was acked).
    fn with_reply<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        if self.reply_ack() {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let r = f(self);
        if !self.need_reply_always {
            self.frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
        }
        r
    }

    fn announce_memory(&mut self, how: MemAnnounce) -> Result<(), SessionError> {
        let regions = self.mem.region_infos()?;
        let fail = |source| SessionError::Vhost {
            step: format!("{how:?}"),
            source,
        };
        match how {
            MemAnnounce::SetMemTable => {
                self.frontend.set_mem_table(&regions).map_err(fail)?;
            }
            MemAnnounce::AddMemReg => {
                for r in &regions {
                    self.frontend.add_mem_region(r).map_err(fail)?;
                }
            }
        }
        Ok(())
    }

    /// Hot-plugs a region: maps a new memfd and tells the backend with ADD_MEM_REG or a full
    /// SET_MEM_TABLE, asking for a reply (if REPLY_ACK was acked) so the backend has applied it
    /// before the next request. Returns an arena over the new region.
    pub fn plug_region(
        &mut self,
        spec: RegionSpec,
        how: MemAnnounce,
    ) -> Result<Arena, SessionError> {
        let what = format!("plug {how:?} {:#x}", spec.guest_addr);
        self.guarded(&what, |s| s.with_reply(|s| s.plug_region_inner(spec, how)))
    }

    fn plug_region_inner(
        &mut self,
        spec: RegionSpec,
        how: MemAnnounce,
    ) -> Result<Arena, SessionError> {
        let info = self.mem.add_region(spec)?;
        let fail = |source| SessionError::Vhost {
            step: format!("plug {how:?} {:#x}", spec.guest_addr),
            source,
        };
        match how {
            MemAnnounce::SetMemTable => {
                let all = self.mem.region_infos()?;
                self.frontend.set_mem_table(&all).map_err(fail)?;
            }
            MemAnnounce::AddMemReg => {
                self.frontend.add_mem_region(&info).map_err(fail)?;
            }
        }
        Ok(Arena::over(spec))
    }

    /// Unplugs the region at `guest_addr` with REM_MEM_REG or a full SET_MEM_TABLE (with a reply,
    /// as for [`Session::plug_region`]). The returned region keeps the frontend's mapping and
    /// memfd alive until dropped, so a test can watch what happens to its pages afterwards.
    pub fn unplug_region(
        &mut self,
        guest_addr: u64,
        how: MemAnnounce,
    ) -> Result<RemovedRegion, SessionError> {
        let what = format!("unplug {how:?} {guest_addr:#x}");
        self.guarded(&what, |s| {
            s.with_reply(|s| s.unplug_region_inner(guest_addr, how))
        })
    }

    fn unplug_region_inner(
        &mut self,
        guest_addr: u64,
        how: MemAnnounce,
    ) -> Result<RemovedRegion, SessionError> {
        let removed = self.mem.remove_region(guest_addr)?;
        let fail = |source| SessionError::Vhost {
            step: format!("unplug {how:?} {guest_addr:#x}"),
            source,
        };
        match how {
            MemAnnounce::SetMemTable => {
                let all = self.mem.region_infos()?;
                self.frontend.set_mem_table(&all).map_err(fail)?;
            }
            MemAnnounce::AddMemReg => {
                let info = removed.info()?;
                self.frontend.remove_mem_region(&info).map_err(fail)?;
            }
        }
        Ok(removed)
    }

    /// Sends one message from another thread and returns at once, so the test can watch what
    /// the backend does before it replies (and when it does). `send` gets a clone of the
    /// frontend; with `need_reply`, the message carries NEED_REPLY (if REPLY_ACK was acked)
    /// and `send` returns only once the backend acknowledged it.
    ///
    /// Send nothing else on this session until the reply has arrived: the frontend is locked
    /// while the message waits for its reply, so anything else would block behind it.
    pub fn send_in_background<T: Send + 'static>(
        &mut self,
        what: &str,
        need_reply: bool,
        send: impl FnOnce(&mut Frontend) -> Result<T, vhost::Error> + Send + 'static,
    ) -> Result<PendingReply<T>, SessionError> {
        let mut frontend = self.frontend.clone();
        let flag = need_reply && self.reply_ack();
        let always = self.need_reply_always;
        let socket = self.socket.try_clone().map_err(SessionError::Socket)?;
        let sent = Instant::now();
        let thread = thread::Builder::new()
            .name(format!("frontend {what}"))
            .spawn(move || {
                if flag {
                    frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
                }
                let r = send(&mut frontend);
                let replied = Instant::now();
                if flag && !always {
                    frontend.set_hdr_flags(VhostUserHeaderFlag::empty());
                }
                (r, replied)
            })
            .map_err(SessionError::Socket)?;
        Ok(PendingReply {
            what: what.to_string(),
            sent,
            thread: Some(thread),
            socket,
        })
    }

    /// REM_MEM_REG (with NEED_REPLY) for the region at `guest_addr`, sent in the background
    /// (see [`Session::send_in_background`]). The region leaves the frontend's guest memory at
    /// once; the returned [`RemovedRegion`] keeps its memfd and mapping for the test.
    pub fn remove_region_in_background(
        &mut self,
        guest_addr: u64,
    ) -> Result<(PendingReply<()>, RemovedRegion), SessionError> {
        let removed = self.mem.remove_region(guest_addr)?;
        let info = removed.info()?;
        let pending =
            self.send_in_background(&format!("REM_MEM_REG {guest_addr:#x}"), true, move |f| {
                f.remove_mem_region(&info)
            })?;
        Ok((pending, removed))
    }

    /// One SET_MEM_TABLE (with NEED_REPLY) that drops the regions starting at `remove` and adds
    /// fresh memfd regions `add`, keeping every other region as it was (same guest address,
    /// size and frontend address), sent in the background.
    pub fn replace_regions_in_background(
        &mut self,
        remove: &[u64],
        add: &[RegionSpec],
    ) -> Result<Replacement, SessionError> {
        let mut removed = Vec::with_capacity(remove.len());
        for &gpa in remove {
            removed.push(self.mem.remove_region(gpa)?);
        }
        for &spec in add {
            self.mem.add_region(spec)?;
        }
        let table = self.mem.region_infos()?;
        let pending = self.send_in_background("SET_MEM_TABLE", true, move |f| {
            f.set_mem_table(&table).map(|_| ())
        })?;
        Ok(Replacement {
            reply: pending,
            removed,
            added: add.iter().map(|&s| Arena::over(s)).collect(),
        })
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

    /// GET_CONFIG, returning the payload.
    pub fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        flags: VhostUserConfigFlags,
    ) -> Result<Vec<u8>, SessionError> {
        self.step(&Step::GetConfig {
            offset,
            size,
            flags,
        })?;
        Ok(self.last_config.clone().unwrap_or_default())
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

    /// Vring `q`.
    pub fn vring(&self, q: usize) -> Result<&Vring, SessionError> {
        self.vrings.get(q).ok_or(SessionError::NoQueue(q))
    }

    /// Vring `q`, mutable, with guest memory alongside (to build chains).
    pub fn vring_mut(&mut self, q: usize) -> Result<(&mut Vring, &GuestMemory), SessionError> {
        let vr = self.vrings.get_mut(q).ok_or(SessionError::NoQueue(q))?;
        Ok((vr, &self.mem))
    }

    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Features from the last GET_FEATURES.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Features sent in the last SET_FEATURES.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Protocol features from the last GET_PROTOCOL_FEATURES.
    pub fn backend_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.backend_protocol_features
    }

    /// Protocol features sent in the last SET_PROTOCOL_FEATURES.
    pub fn acked_protocol_features(&self) -> VhostUserProtocolFeatures {
        self.acked_protocol_features
    }

    /// Reply to the last GET_QUEUE_NUM.
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// Reply to the last GET_MAX_MEM_SLOTS.
    pub fn max_mem_slots(&self) -> Option<u64> {
        self.max_mem_slots
    }

    /// Payload of the last GET_CONFIG.
    pub fn last_config(&self) -> Option<&[u8]> {
        self.last_config.as_deref()
    }

    /// Reply to the last GET_VRING_BASE.
    pub fn last_vring_base(&self) -> Option<u32> {
        self.last_vring_base
    }

    /// Steps completed so far, in order.
    pub fn sent(&self) -> &[Step] {
        &self.sent
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

/// A message sent by [`Session::send_in_background`] whose reply may not have arrived yet.
pub struct PendingReply<T> {
    what: String,
    sent: Instant,
    thread: Option<JoinHandle<(Result<T, vhost::Error>, Instant)>>,
    socket: UnixStream,
}

/// A SET_MEM_TABLE sent by [`Session::replace_regions_in_background`].
pub struct Replacement {
    pub reply: PendingReply<()>,
    /// The regions it dropped (mapped and open until dropped).
    pub removed: Vec<RemovedRegion>,
    /// An arena over each region it added.
    pub added: Vec<Arena>,
}

/// A reply and how long after sending it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply<T> {
    pub value: T,
    pub after: Duration,
}

impl<T> PendingReply<T> {
    /// When the message was handed to the sending thread.
    pub fn sent_at(&self) -> Instant {
        self.sent
    }

    /// Whether the reply (or a failure) has arrived.
    pub fn has_reply(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Waits up to `timeout` (from now) for the reply. On timeout the connection is shut down,
    /// so the backend sees the frontend go away, and this fails.
    pub fn wait(mut self, timeout: Duration) -> Result<Reply<T>, SessionError> {
        let start = Instant::now();
        while !self.has_reply() && start.elapsed() < timeout {
            thread::sleep(Duration::from_millis(2));
        }
        let timed_out = !self.has_reply();
        if timed_out {
            let _ = self.socket.shutdown(Shutdown::Both);
        }
        let Some(thread) = self.thread.take() else {
            return Err(SessionError::NoReply {
                step: self.what.clone(),
                waited: start.elapsed(),
            });
        };
        let joined = thread.join();
        match joined {
            Ok(_) if timed_out => Err(SessionError::NoReply {
                step: self.what.clone(),
                waited: timeout,
            }),
            Ok((Ok(value), replied)) => Ok(Reply {
                value,
                after: replied.saturating_duration_since(self.sent),
            }),
            Ok((Err(source), _)) => Err(SessionError::Vhost {
                step: self.what.clone(),
                source,
            }),
            Err(_) => Err(SessionError::NoReply {
                step: format!("{} (the sending thread panicked)", self.what),
                waited: start.elapsed(),
            }),
        }
    }
}

impl<T> Drop for PendingReply<T> {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            // Abandoned before its reply: unblock the sender by closing the connection.
            if !t.is_finished() {
                let _ = self.socket.shutdown(Shutdown::Both);
            }
            let _ = t.join();
        }
    }
}

/// Shuts the socket down when a step takes longer than `timeout`, so a backend that never
/// replies fails the step (the `vhost` crate retries reads that time out, so SO_RCVTIMEO alone
/// would spin forever).
struct Watchdog {
    timeout: Duration,
    tx: Option<mpsc::Sender<Option<Instant>>>,
    fired: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    fn new(stream: UnixStream, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::channel::<Option<Instant>>();
        let fired = Arc::new(AtomicBool::new(false));
        let flag = fired.clone();
        let thread = thread::spawn(move || {
            let mut deadline: Option<Instant> = None;
            loop {
                let msg = match deadline {
                    Some(d) => rx.recv_timeout(d.saturating_duration_since(Instant::now())),
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match msg {
                    Ok(d) => deadline = d,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        flag.store(true, AtomicOrdering::SeqCst);
                        let _ = stream.shutdown(Shutdown::Both);
                        deadline = None;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        });
        Self {
            timeout,
            tx: Some(tx),
            fired,
            thread: Some(thread),
        }
    }

    fn arm(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Some(Instant::now() + self.timeout));
        }
    }

    /// Returns whether the watchdog fired since it was armed.
    fn disarm(&self) -> bool {
        if let Some(tx) = &self.tx {
            let _ = tx.send(None);
        }
        self.fired.load(AtomicOrdering::SeqCst)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
