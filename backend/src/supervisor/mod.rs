//! The supervisor: owns the sockets, identifies the VMM behind each connection, and hands the
//! connection to that VM's worker, spawning the worker on the VM's first connection. It never
//! maps guest memory. It is single-threaded (one epoll loop), which is what lets it fork
//! workers safely.
//!
//! A VM is keyed by its VMM's pid and start time, held by a pidfd: a recycled pid is a new VM.
//!
//! The loop never waits on anything a tenant controls (docs/security.md): control sockets are
//! non-blocking, with at most [`MAX_WAITING`] connections per VM waiting for its worker to
//! take them; a worker that has not exec'd within [`START_DEADLINE`] (a frozen cgroup, a
//! stopped child) is killed and counts as a failed start; failed starts back off per VMM
//! ([`tenants::StartBackoff`]); every line a tenant can provoke goes through its uid's log
//! budget ([`tenants::TenantLog`]).
//!
//! ```text
//! accept ─▶ identify (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD) ─▶ export allow-list
//!        ─▶ the VMM's live VM?  yes ─▶ per-VMM cap, waiting bound ─▶ outbox ─▶ control socket
//!                               no  ─▶ backoff, per-uid cap, /proc identity agrees with the
//!                                      socket's, RLIMIT_NOFILE ─▶ fork (Starting) ─▶ exec'd
//!                                      (Running) ─▶ outbox flushed
//! ```

mod spawn;
mod status;
mod tenants;

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::cli::{ExportSpec, OpenAs};
use crate::daemon::{DaemonError, Endpoint, Listener, SocketAccess};
use crate::disk::{Disk, DiskSpec};
use crate::handoff::{self, DeviceStatus, ToSupervisor, ToWorker};
use crate::identity::{IdentityError, Peer, VmmIdentity};
use crate::ratelimit::RateLimit;

pub use spawn::{adopt_control, WORKER_CONTROL_FD};
use spawn::{exec_outcome, spawn_worker, ExecOutcome, Executable};
pub use status::{print_status, Status, VmStatus};
use tenants::{left_out, StartBackoff, TenantLog, Verdict};
pub use tenants::{TenantLimits, DEFAULT_CONNECTIONS_PER_VMM, DEFAULT_VMS_PER_UID};

/// epoll tokens: the signalfd, listeners (by export index), workers (by VM id).
const EV_SIGNAL: u64 = 0;
const EV_LISTENER: u64 = 1 << 32;
const EV_WORKER_CONTROL: u64 = 2 << 32;
const EV_WORKER_EXIT: u64 = 3 << 32;
const EV_CONTROL: u64 = 4 << 32;
const EV_WORKER_START: u64 = 5 << 32;
const TOKEN_MASK: u64 = (1 << 32) - 1;

/// How long workers get to stop their devices when the supervisor is told to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a forked worker has to exec. It takes milliseconds; a child that joined a frozen
/// cgroup, or that its tenant stopped, would never report.
const START_DEADLINE: Duration = Duration::from_secs(2);
/// Connections a VM's worker has not taken yet (sent, or waiting to be sent) at most; past it
/// the VM's new connections are closed. A worker that is stopped takes none.
pub const MAX_WAITING: usize = 16;
/// The RLIMIT_NOFILE a worker needs at least: its control socket, epoll and eventfds, and per
/// device the connection, the disk, memory regions, and per queue kick, call and error
/// eventfds and an io_uring.
pub const WORKER_MIN_NOFILE: u64 = 64;

struct Export {
    spec: ExportSpec,
    listener: Listener,
}

/// Where a VM's worker is in its life.
enum WorkerState {
    /// Forked, not exec'd yet: connections wait in the outbox.
    Starting {
        exec_status: OwnedFd,
        deadline: Instant,
    },
    Running,
    /// It cannot take connections (it died, failed to start, or is exiting): new connections
    /// of this VMM go to a new worker; its pidfd still reports when it is gone, and `reap`
    /// clears it.
    Retired,
}

/// One VM: its VMM and the worker serving it.
struct Vm {
    vmm_pid: i32,
    vmm_key: (i32, u64),
    /// The credentials the kernel recorded when the VMM connected; its worker carries them.
    uid: u32,
    gid: u32,
    groups: Vec<u32>,
    worker_pid: i32,
    worker_pidfd: OwnedFd,
    control: OwnedFd,
    state: WorkerState,
    /// Connections sent to the worker and not ended.
    live: HashSet<u64>,
    /// Connections waiting to be sent (the worker is starting, or its socket is full).
    outbox: VecDeque<Handoff>,
    /// Connections sent to the worker that it has not acknowledged yet; if it dies first,
    /// they go to a new worker.
    pending: Vec<Handoff>,
    /// The worker acknowledged a connection: it started.
    took_one: bool,
    /// Its failure to start was already counted against its VMM.
    failure_counted: bool,
    /// The control socket is watched for room to send.
    watching_writable: bool,
    identity: VmmIdentity,
    /// The worker's last report.
    devices: Vec<DeviceStatus>,
}

impl Vm {
    fn takes_connections(&self) -> bool {
        !matches!(self.state, WorkerState::Retired)
    }

    /// Connections the worker has not taken.
    fn waiting(&self) -> usize {
        self.outbox.len() + self.pending.len()
    }

    /// Connections of the VMM this VM holds, served or waiting.
    fn open_connections(&self) -> usize {
        self.live.len() + self.outbox.len()
    }
}

/// A connection on its way to a worker. The supervisor keeps its copy of the socket until the
/// worker acknowledges it: a worker killed just before reading the message (the VMM then
/// reconnects at once, as cloud-hypervisor does) must not take the connection with it.
struct Handoff {
    connection: u64,
    export: usize,
    stream: OwnedFd,
    peer: Peer,
    /// With `open-as=daemon`, the backing the supervisor opened.
    disk: Option<OwnedFd>,
}

pub fn run(
    exports: Vec<(Endpoint, ExportSpec)>,
    limits: TenantLimits,
    control_socket: Option<PathBuf>,
) -> Result<(), DaemonError> {
    let signals = crate::daemon::Signals::block_and_watch().map_err(DaemonError::EventLoop)?;
    raise_nofile_limit();
    let exe = Executable::current().map_err(DaemonError::EventLoop)?;
    let (open, control) = open_sockets(exports, control_socket)?;
    let mut supervisor = Supervisor::new(open, exe, limits)?;
    supervisor
        .watch(signals.as_raw_fd(), EV_SIGNAL)
        .map_err(DaemonError::EventLoop)?;
    if let Some(Listener::Listening { listener, .. }) = &control {
        supervisor
            .watch(listener.as_raw_fd(), EV_CONTROL)
            .map_err(DaemonError::EventLoop)?;
    }
    supervisor.control = control;
    let result = supervisor.serve(&signals);
    supervisor.stop();
    result
}

/// Every connection waiting for a worker costs the supervisor descriptors: take the hard
/// limit rather than systemd's soft 1024.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur >= limit.rlim_max
    {
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: setrlimit reads the local.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        tracing::debug!(
            "RLIMIT_NOFILE raised from {} to {}",
            limit.rlim_cur,
            limit.rlim_max
        );
    } else {
        tracing::warn!(
            "cannot raise RLIMIT_NOFILE to {}: {}",
            limit.rlim_max,
            io::Error::last_os_error()
        );
    }
}

/// Opens every export's socket, then the status socket: last, so that its appearance tells a
/// launcher vublk is ready. A failure removes the sockets already created.
fn open_sockets(
    exports: Vec<(Endpoint, ExportSpec)>,
    control_socket: Option<PathBuf>,
) -> Result<(Vec<Export>, Option<Listener>), DaemonError> {
    let mut open = Vec::new();
    let bind_all = || -> Result<Option<Listener>, DaemonError> {
        for (endpoint, spec) in exports {
            open.push(Export {
                listener: endpoint.open(spec.socket)?,
                spec,
            });
        }
        // The status socket shows every VM's identity: owner only.
        let owner_only = SocketAccess {
            mode: Some(0o600),
            group: None,
        };
        control_socket
            .map(|path| Endpoint::Path(path).open(owner_only))
            .transpose()
    };
    match bind_all() {
        Ok(control) => Ok((open, control)),
        Err(e) => {
            open.iter().for_each(|export| export.listener.cleanup());
            Err(e)
        }
    }
}

/// Log levels of tenant-provoked lines.
#[derive(Clone, Copy)]
enum Level {
    Debug,
    Info,
    Warn,
}

struct Supervisor {
    epoll: i32,
    exports: Vec<Export>,
    exe: Executable,
    vms: HashMap<u64, Vm>,
    next_vm: u64,
    next_connection: u64,
    /// Exports whose endpoint was one connected socket, still being served.
    connected_left: usize,
    /// Where `vublk status` asks.
    control: Option<Listener>,
    limits: TenantLimits,
    backoff: StartBackoff,
    log: TenantLog,
    /// A descriptor given up when accept fails for lack of them, so the connection can be
    /// taken and closed instead of waking the loop again and again.
    reserve: Option<OwnedFd>,
    /// Lines about the supervisor itself running short (no tenant to charge them to).
    overload_log: RateLimit,
}

impl Supervisor {
    fn new(
        exports: Vec<Export>,
        exe: Executable,
        limits: TenantLimits,
    ) -> Result<Supervisor, DaemonError> {
        let epoll = epoll::create(true).map_err(DaemonError::EventLoop)?;
        let mut supervisor = Supervisor {
            epoll,
            exports,
            exe,
            vms: HashMap::new(),
            next_vm: 1,
            next_connection: 1,
            connected_left: 0,
            control: None,
            limits,
            backoff: StartBackoff::default(),
            log: TenantLog::default(),
            reserve: open_reserve(),
            overload_log: RateLimit::new(5, Duration::from_secs(10)),
        };
        for index in 0..supervisor.exports.len() {
            let fd = match &supervisor.exports[index].listener {
                Listener::Listening { listener, .. } => {
                    // Level-triggered: a connection that went away before accept must not block it.
                    listener
                        .set_nonblocking(true)
                        .map_err(DaemonError::EventLoop)?;
                    Some(listener.as_raw_fd())
                }
                Listener::Connected(_) => None,
            };
            match fd {
                Some(fd) => supervisor
                    .watch(fd, EV_LISTENER | index as u64)
                    .map_err(DaemonError::EventLoop)?,
                None => {
                    supervisor.connected_left += 1;
                    let stream = match &supervisor.exports[index].listener {
                        Listener::Connected(s) => s.try_clone().map_err(DaemonError::EventLoop)?,
                        Listener::Listening { .. } => unreachable!("matched above"),
                    };
                    supervisor.hand_over(index, stream);
                }
            }
        }
        Ok(supervisor)
    }

    fn watch(&self, fd: i32, token: u64) -> io::Result<()> {
        epoll::ctl(
            self.epoll,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            fd,
            epoll::Event::new(epoll::Events::EPOLLIN, token),
        )
    }

    fn unwatch(&self, fd: i32) {
        let _ = epoll::ctl(
            self.epoll,
            epoll::ControlOptions::EPOLL_CTL_DEL,
            fd,
            epoll::Event::new(epoll::Events::empty(), 0),
        );
    }

    fn only_connected(&self) -> bool {
        self.exports
            .iter()
            .all(|e| matches!(e.listener, Listener::Connected(_)))
    }

    /// Writes a line a tenant (`uid`) caused, within that uid's log budget for lines of its
    /// `kind`.
    fn tenant_line(
        &mut self,
        uid: u32,
        level: Level,
        kind: &'static str,
        line: impl FnOnce() -> String,
    ) {
        if matches!(level, Level::Debug) {
            tracing::debug!("{}", line());
            return;
        }
        let Some(suppressed) = self.log.admit(uid, kind, Instant::now()) else {
            return;
        };
        let line = format!("{}{}", line(), left_out(suppressed, uid));
        match level {
            Level::Debug => tracing::debug!("{line}"),
            Level::Info => tracing::info!("{line}"),
            Level::Warn => tracing::warn!("{line}"),
        }
    }

    /// When the loop must wake up next without an event: the earliest start deadline.
    fn next_deadline(&self) -> Option<Instant> {
        self.vms
            .values()
            .filter_map(|vm| match &vm.state {
                WorkerState::Starting { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .min()
    }

    fn serve(&mut self, signals: &crate::daemon::Signals) -> Result<(), DaemonError> {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 16];
        loop {
            if self.only_connected() && self.connected_left == 0 {
                return Ok(());
            }
            let timeout = self.next_deadline().map_or(-1, |d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .min(i32::MAX as u128) as i32
                    + 1
            });
            let n = match epoll::wait(self.epoll, timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DaemonError::EventLoop(e)),
            };
            for event in events[..n].iter().copied() {
                let token = event.data;
                let id = token & TOKEN_MASK;
                match token & !TOKEN_MASK {
                    EV_SIGNAL if token == EV_SIGNAL => {
                        tracing::info!("{} received, stopping", signals.read());
                        return Ok(());
                    }
                    EV_LISTENER => self.accept(id as usize),
                    EV_WORKER_CONTROL => {
                        let ready = epoll::Events::from_bits_truncate(event.events);
                        if ready.contains(epoll::Events::EPOLLOUT) {
                            self.flush(id);
                        }
                        if ready.intersects(
                            epoll::Events::EPOLLIN
                                | epoll::Events::EPOLLHUP
                                | epoll::Events::EPOLLERR,
                        ) {
                            self.on_worker_message(id);
                        }
                    }
                    EV_WORKER_START => self.on_worker_start(id),
                    EV_WORKER_EXIT => self.reap(id),
                    EV_CONTROL => self.answer_status(),
                    _ => {}
                }
            }
            self.expire_starts(Instant::now());
        }
    }

    fn accept(&mut self, index: usize) {
        let Listener::Listening { listener, .. } = &self.exports[index].listener else {
            return;
        };
        match listener.accept() {
            Ok((stream, _)) => self.hand_over(index, stream),
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                self.shed(index)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                if let Some(suppressed) = self.overload_log.check(Instant::now()) {
                    tracing::warn!(
                        "accept on {} failed: {e} ({suppressed} similar lines left out)",
                        self.exports[index].spec.name
                    );
                }
            }
        }
    }

    /// Out of descriptors: take the connection with the reserved one and close it, so the
    /// listener does not stay readable and the loop keeps serving everyone else.
    fn shed(&mut self, index: usize) {
        self.reserve = None;
        let Listener::Listening { listener, .. } = &self.exports[index].listener else {
            return;
        };
        let uid = listener.accept().ok().map(|(stream, _)| {
            rustix::net::sockopt::socket_peercred(&stream).map_or(u32::MAX, |c| c.uid.as_raw())
        });
        self.reserve = open_reserve();
        if let Some(uid) = uid {
            let name = self.exports[index].spec.name.clone();
            self.tenant_line(uid, Level::Warn, "out-of-fds", || {
                format!("{name}: out of file descriptors; connection from uid {uid} closed")
            });
        }
    }

    /// Identifies the VMM behind `stream`, checks the export allows it, and passes the
    /// connection on.
    fn hand_over(&mut self, index: usize, stream: UnixStream) {
        let name = self.exports[index].spec.name.clone();
        let peer = match Peer::of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                let uid = rustix::net::sockopt::socket_peercred(&stream)
                    .map_or(u32::MAX, |c| c.uid.as_raw());
                self.tenant_line(uid, Level::Warn, "unidentified", || {
                    format!(
                        "{name}: cannot identify the frontend: {}; connection closed",
                        crate::error_line(&e)
                    )
                });
                self.connected_done(index);
                return;
            }
        };
        if !self.exports[index]
            .spec
            .allow
            .allows(peer.uid, peer.gid, &peer.groups)
        {
            let (pid, uid, gid, groups) = (peer.pid, peer.uid, peer.gid, peer.groups.clone());
            self.tenant_line(uid, Level::Warn, "not-allowed", || {
                format!("{name}: VMM pid {pid} (uid {uid} gid {gid} groups {groups:?}) is not allowed on this export (allow-uids, allow-gids); connection closed")
            });
            self.connected_done(index);
            return;
        }
        let connection = self.next_connection;
        self.next_connection += 1;
        self.dispatch(Handoff {
            connection,
            export: index,
            stream: OwnedFd::from(stream),
            peer,
            disk: None,
        });
    }

    /// Closes a connection that will not be served, with a line charged to its VMM's uid.
    fn refuse(
        &mut self,
        handoff: Handoff,
        level: Level,
        kind: &'static str,
        why: impl FnOnce() -> String,
    ) {
        let name = self.exports[handoff.export].spec.name.clone();
        let (connection, pid, uid) = (handoff.connection, handoff.peer.pid, handoff.peer.uid);
        self.tenant_line(uid, level, kind, || {
            format!(
                "{name}: connection {connection} of VMM pid {pid} (uid {uid}) closed: {}",
                why()
            )
        });
        self.connected_done(handoff.export);
    }

    /// Sends a connection to the worker of its VMM, starting one if there is none (or the one
    /// there is cannot take it), within the tenant's limits.
    fn dispatch(&mut self, mut handoff: Handoff) {
        let key = (handoff.peer.pid, handoff.peer.start_time);
        let live = self
            .vms
            .iter()
            .find(|(_, vm)| vm.vmm_key == key && vm.takes_connections())
            .map(|(id, _)| *id);
        let vm_id = match live {
            Some(id) => {
                let vm = &self.vms[&id];
                if (vm.uid, vm.gid, sorted(&vm.groups))
                    != (
                        handoff.peer.uid,
                        handoff.peer.gid,
                        sorted(&handoff.peer.groups),
                    )
                {
                    let (uid, gid) = (vm.uid, vm.gid);
                    return self.refuse(handoff, Level::Warn, "credentials", || {
                        format!("the VMM changed its credentials since it connected first (its worker carries uid {uid} gid {gid})")
                    });
                }
                if vm.open_connections() >= self.limits.connections_per_vmm {
                    let limit = self.limits.connections_per_vmm;
                    return self.refuse(handoff, Level::Warn, "connection-cap", || format!("it has {limit} connections, the most a VMM may have (--max-connections-per-vmm)"));
                }
                if vm.waiting() >= MAX_WAITING {
                    let (worker, waiting) = (vm.worker_pid, vm.waiting());
                    return self.refuse(handoff, Level::Warn, "waiting", || {
                        format!("worker pid {worker} has {waiting} connections waiting to be taken")
                    });
                }
                if let Err(why) = self.open_disk(&mut handoff) {
                    return self.refuse(handoff, Level::Warn, "image", || why);
                }
                id
            }
            None => {
                match self.backoff.check(key, Instant::now()) {
                    Verdict::Start => {}
                    // The failure was explained once, when it happened.
                    Verdict::Wait(until) => {
                        let ms = until.saturating_duration_since(Instant::now()).as_millis();
                        return self.refuse(handoff, Level::Debug, "backoff", || {
                            format!("its last worker failed to start; next try in {ms} ms")
                        });
                    }
                    Verdict::GivenUp(until) => {
                        let s = until.saturating_duration_since(Instant::now()).as_secs();
                        return self.refuse(handoff, Level::Debug, "backoff", || {
                            format!("its workers keep failing to start; next try in {s} s")
                        });
                    }
                }
                let uid = handoff.peer.uid;
                let vms_of_uid = self
                    .vms
                    .values()
                    .filter(|vm| vm.uid == uid && vm.takes_connections())
                    .count();
                if vms_of_uid >= self.limits.vms_per_uid {
                    let limit = self.limits.vms_per_uid;
                    return self.refuse(handoff, Level::Warn, "vm-cap", || format!("uid {uid} has {limit} VMs, the most a uid may have (--max-vms-per-uid)"));
                }
                // Before a worker exists: an image that cannot be opened needs none.
                if let Err(why) = self.open_disk(&mut handoff) {
                    return self.refuse(handoff, Level::Warn, "image", || why);
                }
                match self.spawn(&handoff.peer) {
                    Ok(id) => id,
                    Err(StartError::Gone) => {
                        return self
                            .refuse(handoff, Level::Debug, "gone", || "the VMM exited".into())
                    }
                    Err(StartError::Refused(reason)) => {
                        return self.start_failed(
                            key,
                            handoff.peer.uid,
                            handoff.peer.pid,
                            &reason,
                            vec![handoff],
                        );
                    }
                }
            }
        };
        if let Some(vm) = self.vms.get_mut(&vm_id) {
            vm.outbox.push_back(handoff);
        }
        self.flush(vm_id);
    }

    /// With `open-as=daemon`, opens the export's image for `handoff` (as root, without following
    /// symlinks, and only the file seen at start).
    fn open_disk(&self, handoff: &mut Handoff) -> Result<(), String> {
        let spec = &self.exports[handoff.export].spec;
        if let (OpenAs::Daemon, DiskSpec::Path(path)) = (spec.open_as, &spec.disk) {
            let (file, _) = Disk::open_for_daemon(path, spec.open, spec.daemon_file)
                .map_err(|e| crate::error_line(&e))?;
            handoff.disk = Some(OwnedFd::from(file));
        }
        Ok(())
    }

    /// A worker for VMM `key` could not be started: counts it, closes `handoffs` with one line
    /// that says why and what follows.
    fn start_failed(
        &mut self,
        key: (i32, u64),
        uid: u32,
        pid: i32,
        reason: &str,
        handoffs: Vec<Handoff>,
    ) {
        let (count, verdict) = self.backoff.failed(key, Instant::now());
        let next = match verdict {
            Verdict::GivenUp(_) => format!(
                "{count} worker starts failed in a row, so its connections are closed for {} s",
                tenants::GIVE_UP.as_secs()
            ),
            Verdict::Wait(until) => format!(
                "next try in {} ms",
                until.saturating_duration_since(Instant::now()).as_millis()
            ),
            Verdict::Start => "next try at its next connection".into(),
        };
        let closed = handoffs.len();
        self.tenant_line(uid, Level::Warn, "start-failed", || {
            format!("cannot start a worker for VMM pid {pid} (uid {uid}): {reason}; {next}; {closed} connection(s) closed")
        });
        for handoff in handoffs {
            self.connected_done(handoff.export);
        }
    }

    /// Sends what waits in the VM's outbox, until the control socket is full.
    fn flush(&mut self, id: u64) {
        loop {
            let Some(vm) = self.vms.get_mut(&id) else {
                return;
            };
            if !matches!(vm.state, WorkerState::Running) {
                return;
            }
            let Some(handoff) = vm.outbox.front() else {
                break;
            };
            let spec = self.exports[handoff.export].spec.clone();
            let message = ToWorker::Serve {
                connection: handoff.connection,
                export: spec,
                disk_fd_attached: handoff.disk.is_some(),
            };
            let mut fds = vec![&handoff.stream, &handoff.peer.pidfd];
            if let Some(disk) = &handoff.disk {
                fds.push(disk);
            }
            match handoff::send(&vm.control, &message, &fds) {
                Ok(()) => {
                    let handoff = vm.outbox.pop_front().expect("front exists");
                    vm.live.insert(handoff.connection);
                    let (worker, uid) = (vm.worker_pid, vm.uid);
                    let (connection, pid, name) = (
                        handoff.connection,
                        handoff.peer.pid,
                        self.exports[handoff.export].spec.name.clone(),
                    );
                    vm.pending.push(handoff);
                    self.tenant_line(uid, Level::Info, "handed-over", || {
                        format!("{name}: connection {connection} from VMM pid {pid} (uid {uid}) handed to worker pid {worker}")
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !vm.watching_writable {
                        vm.watching_writable = true;
                        let fd = vm.control.as_raw_fd();
                        self.rewatch_control(fd, id, true);
                    }
                    return;
                }
                Err(e) => {
                    // The worker is gone or broken: its connections go to a new one.
                    vm.state = WorkerState::Retired;
                    let left: Vec<Handoff> = vm.outbox.drain(..).collect();
                    let (worker, uid) = (vm.worker_pid, vm.uid);
                    let fd = vm.control.as_raw_fd();
                    self.unwatch(fd);
                    self.tenant_line(uid, Level::Warn, "worker-broken", || format!("worker pid {worker} cannot take connections ({e}); starting a new worker"));
                    for handoff in left {
                        self.dispatch(handoff);
                    }
                    return;
                }
            }
        }
        if let Some(vm) = self.vms.get_mut(&id) {
            if vm.watching_writable {
                vm.watching_writable = false;
                let fd = vm.control.as_raw_fd();
                self.rewatch_control(fd, id, false);
            }
        }
    }

    fn rewatch_control(&self, fd: i32, id: u64, writable: bool) {
        let mut events = epoll::Events::EPOLLIN;
        if writable {
            events |= epoll::Events::EPOLLOUT;
        }
        let _ = epoll::ctl(
            self.epoll,
            epoll::ControlOptions::EPOLL_CTL_MOD,
            fd,
            epoll::Event::new(events, EV_WORKER_CONTROL | id),
        );
    }

    /// A connection of `export` will not be served (counts down a `--fd` connected socket).
    fn connected_done(&mut self, export: usize) {
        if matches!(self.exports[export].listener, Listener::Connected(_)) {
            self.connected_left = self.connected_left.saturating_sub(1);
        }
    }

    /// Reads the VMM's identity, checks a worker can live with it, and forks the worker. It
    /// does not wait for the child: `on_worker_start` and `expire_starts` see how it went.
    fn spawn(&mut self, peer: &Peer) -> Result<u64, StartError> {
        let identity = match VmmIdentity::read_for(peer) {
            Ok(identity) => identity,
            Err(IdentityError::Gone(_)) => return Err(StartError::Gone),
            Err(e) => return Err(StartError::Refused(crate::error_line(&e))),
        };
        if let Some(nofile) = identity
            .soft_limit(libc::RLIMIT_NOFILE)
            .filter(|&n| n < WORKER_MIN_NOFILE)
        {
            return Err(StartError::Refused(format!(
                "RLIMIT_NOFILE {nofile} of VMM pid {} is below the {WORKER_MIN_NOFILE} a worker needs",
                peer.pid
            )));
        }
        let worker = spawn_worker(&identity, &self.exe)
            .map_err(|e| StartError::Refused(format!("cannot fork a worker: {e}")))?;
        let id = self.next_vm;
        self.next_vm += 1;
        let watched = self
            .watch(worker.control.as_raw_fd(), EV_WORKER_CONTROL | id)
            .and_then(|()| self.watch(worker.pidfd.as_raw_fd(), EV_WORKER_EXIT | id))
            .and_then(|()| self.watch(worker.exec_status.as_raw_fd(), EV_WORKER_START | id));
        if let Err(e) = watched {
            kill(&worker.pidfd);
            self.unwatch(worker.control.as_raw_fd());
            self.unwatch(worker.pidfd.as_raw_fd());
            // Reaped only if already gone: a child frozen in its cgroup dies once thawed.
            if wait_exit(&worker.pidfd, Duration::ZERO) {
                wait_pidfd(&worker.pidfd);
            }
            return Err(StartError::Refused(format!(
                "cannot watch the new worker: {e}"
            )));
        }
        self.tenant_line(peer.uid, Level::Info, "worker-started", || {
            format!(
                "VMM pid {} (uid {} gid {}): worker pid {} started in {} cgroup(s)",
                peer.pid,
                identity.ids.uid[1],
                identity.ids.gid[1],
                worker.pid,
                identity.cgroup_procs.len()
            )
        });
        self.vms.insert(
            id,
            Vm {
                vmm_pid: peer.pid,
                vmm_key: (peer.pid, peer.start_time),
                uid: peer.uid,
                gid: peer.gid,
                groups: peer.groups.clone(),
                worker_pid: worker.pid,
                worker_pidfd: worker.pidfd,
                control: worker.control,
                state: WorkerState::Starting {
                    exec_status: worker.exec_status,
                    deadline: Instant::now() + START_DEADLINE,
                },
                live: HashSet::new(),
                outbox: VecDeque::new(),
                pending: Vec::new(),
                took_one: false,
                failure_counted: false,
                watching_writable: false,
                identity,
                devices: Vec::new(),
            },
        );
        Ok(id)
    }

    /// The exec-status pipe of a starting worker is readable: it exec'd, or failed.
    fn on_worker_start(&mut self, id: u64) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let WorkerState::Starting { exec_status, .. } = &vm.state else {
            return;
        };
        match exec_outcome(exec_status) {
            ExecOutcome::Pending => {}
            ExecOutcome::Started => {
                let starting = std::mem::replace(&mut vm.state, WorkerState::Running);
                self.stop_watching_start(starting);
                self.flush(id);
            }
            ExecOutcome::Failed(reason) => {
                let reason = format!("worker pid {}: {reason}", vm.worker_pid);
                self.fail_start(id, &reason);
            }
        }
    }

    fn stop_watching_start(&self, state: WorkerState) {
        if let WorkerState::Starting { exec_status, .. } = state {
            self.unwatch(exec_status.as_raw_fd());
        }
    }

    /// Kills workers that have not exec'd by their deadline.
    fn expire_starts(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .vms
            .iter()
            .filter(|(_, vm)| matches!(vm.state, WorkerState::Starting { deadline, .. } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in late {
            let Some(vm) = self.vms.get(&id) else {
                continue;
            };
            kill(&vm.worker_pidfd);
            let reason = format!(
                "worker pid {} did not start within {} s (is the VMM's cgroup frozen?); killed",
                vm.worker_pid,
                START_DEADLINE.as_secs()
            );
            self.fail_start(id, &reason);
        }
    }

    /// A worker that will not start: retired, counted against its VMM, its connections closed.
    fn fail_start(&mut self, id: u64, reason: &str) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let before = std::mem::replace(&mut vm.state, WorkerState::Retired);
        vm.failure_counted = true;
        let handoffs: Vec<Handoff> = vm.outbox.drain(..).chain(vm.pending.drain(..)).collect();
        let (key, uid, pid) = (vm.vmm_key, vm.uid, vm.vmm_pid);
        self.stop_watching_start(before);
        self.start_failed(key, uid, pid, reason, handoffs);
    }

    fn on_worker_message(&mut self, id: u64) {
        let only_connected = self.only_connected();
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let message = handoff::recv::<ToSupervisor>(&vm.control);
        let ended = match message {
            Ok(Some((ToSupervisor::Stats { devices }, _))) => {
                vm.devices = devices;
                return;
            }
            Ok(Some((ToSupervisor::Accepted { connection }, _))) => {
                vm.pending.retain(|h| h.connection != connection);
                vm.took_one = true;
                return;
            }
            Ok(Some((ToSupervisor::Ended { connection }, _))) => {
                tracing::debug!(
                    "connection {connection} ended (worker pid {})",
                    vm.worker_pid
                );
                connection
            }
            Ok(Some((
                ToSupervisor::Refused {
                    connection,
                    export,
                    reason,
                },
                _,
            ))) => {
                let (worker, uid, pid) = (vm.worker_pid, vm.uid, vm.vmm_pid);
                self.tenant_line(uid, Level::Warn, "worker-refused", || format!("{export}: worker pid {worker} refused connection {connection} of VMM pid {pid}: {reason}"));
                connection
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Ok(None) | Err(_) => {
                // The worker is exiting; its pidfd reports when it is gone.
                vm.state = WorkerState::Retired;
                let fd = vm.control.as_raw_fd();
                self.unwatch(fd);
                return;
            }
        };
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        // A worker can only end what it was given.
        if vm.live.remove(&ended) && only_connected {
            self.connected_left = self.connected_left.saturating_sub(1);
        }
    }

    fn reap(&mut self, id: u64) {
        let Some(mut vm) = self.vms.remove(&id) else {
            return;
        };
        self.unwatch(vm.worker_pidfd.as_raw_fd());
        self.unwatch(vm.control.as_raw_fd());
        if let WorkerState::Starting { exec_status, .. } = &vm.state {
            self.unwatch(exec_status.as_raw_fd());
        }
        let status = wait_pidfd(&vm.worker_pidfd);
        let (worker, pid, uid) = (vm.worker_pid, vm.vmm_pid, vm.uid);
        self.tenant_line(uid, Level::Info, "worker-exited", || {
            format!("worker pid {worker} for VMM pid {pid} exited ({status})")
        });
        // Connections it took and had not ended died with it.
        let taken = vm.live.len().saturating_sub(vm.pending.len());
        if self.only_connected() {
            self.connected_left = self.connected_left.saturating_sub(taken);
        }
        let left: Vec<Handoff> = vm.pending.drain(..).chain(vm.outbox.drain(..)).collect();
        if !vm.took_one && !vm.failure_counted {
            // It died before taking a single connection: sending them to another worker would
            // only start the same failure again.
            return self.start_failed(
                vm.vmm_key,
                uid,
                pid,
                &format!("worker pid {worker} exited before taking a connection ({status})"),
                left,
            );
        }
        // Connections it never read: to a new worker, while their VMM lives.
        for handoff in left {
            if handoff.peer.exited() {
                self.connected_done(handoff.export);
                continue;
            }
            let connection = handoff.connection;
            self.tenant_line(uid, Level::Info, "handed-again", || format!("connection {connection} was never taken by worker pid {worker}; handing it to a new worker"));
            self.dispatch(handoff);
        }
    }

    /// Closes every worker's control socket (workers stop their devices and exit), waits for
    /// them a while, kills stragglers, and removes the sockets we created.
    fn stop(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        let vms: Vec<Vm> = self.vms.drain().map(|(_, vm)| vm).collect();
        for vm in &vms {
            let _ = rustix::net::shutdown(&vm.control, rustix::net::Shutdown::Both);
        }
        for vm in vms {
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_exit(&vm.worker_pidfd, left) {
                tracing::warn!(
                    "worker pid {} did not stop in time; killing it",
                    vm.worker_pid
                );
                kill(&vm.worker_pidfd);
                // A child frozen in its cgroup dies only once thawed: do not wait for it.
                if !wait_exit(&vm.worker_pidfd, Duration::from_secs(1)) {
                    tracing::warn!(
                        "worker pid {} is not gone after SIGKILL (frozen?); leaving it",
                        vm.worker_pid
                    );
                    continue;
                }
            }
            let status = wait_pidfd(&vm.worker_pidfd);
            tracing::info!("worker pid {} exited ({status})", vm.worker_pid);
        }
        for export in &self.exports {
            export.listener.cleanup();
        }
        if let Some(control) = &self.control {
            control.cleanup();
        }
    }

    fn status(&self) -> Status {
        let mut vms: Vec<VmStatus> = self
            .vms
            .values()
            .map(|vm| VmStatus {
                vmm_pid: vm.vmm_pid,
                worker_pid: vm.worker_pid,
                uid: vm.identity.ids.uid[1],
                gid: vm.identity.ids.gid[1],
                groups: vm.identity.ids.groups.clone(),
                cgroups: vm
                    .identity
                    .cgroups
                    .iter()
                    .map(|c| format!("{}:{}", c.controllers.join(","), c.path))
                    .collect(),
                limits: vm.identity.limits.clone(),
                devices: vm.devices.clone(),
            })
            .collect();
        vms.sort_by_key(|vm| vm.vmm_pid);
        Status {
            exports: self.exports.iter().map(|e| e.spec.name.clone()).collect(),
            vms,
        }
    }

    fn answer_status(&mut self) {
        let Some(Listener::Listening { listener, .. }) = &self.control else {
            return;
        };
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        // A client that does not read must not stall the supervisor for long.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        let _ = std::io::Write::write_all(&mut stream, &body);
    }
}

/// Why no worker was started for a connection.
enum StartError {
    /// The VMM exited meanwhile: nothing to report.
    Gone,
    /// Counted as a failed start, with this reason.
    Refused(String),
}

fn sorted(groups: &[u32]) -> Vec<u32> {
    let mut groups = groups.to_vec();
    groups.sort_unstable();
    groups.dedup();
    groups
}

fn open_reserve() -> Option<OwnedFd> {
    rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()
}

fn kill(pidfd: &OwnedFd) {
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// Waits up to `timeout` for the process behind `pidfd` to exit.
fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one valid pollfd.
    let ready = unsafe {
        libc::poll(
            &mut pfd,
            1,
            timeout.as_millis().min(i32::MAX as u128) as i32,
        )
    };
    ready > 0
}

/// Reaps the child behind `pidfd`; describes how it ended.
fn wait_pidfd(pidfd: &OwnedFd) -> String {
    // SAFETY: an all-zero siginfo_t is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pidfd, filling the local.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED,
        )
    };
    if ret != 0 {
        return format!("status unknown: {}", io::Error::last_os_error());
    }
    // SAFETY: waitid filled a SIGCHLD siginfo.
    let (code, status) = unsafe { (info.si_code, info.si_status()) };
    match code {
        libc::CLD_EXITED => format!("exit {status}"),
        _ => format!("killed by signal {status}"),
    }
}
