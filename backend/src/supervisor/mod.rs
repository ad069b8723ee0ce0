//! The supervisor: owns the sockets, identifies the VMM behind each connection, and hands the
//! connection to that VM's worker, spawning the worker on the VM's first connection. It never
//! maps guest memory. It is single-threaded (one epoll loop), which is what lets it fork
//! workers safely.
//!
//! A VM is keyed by its VMM's pid and start time, held by a pidfd: a recycled pid is a new VM.
//!
//! The loop never waits on anything a tenant controls (docs/security.md): control sockets are
//! non-blocking and send-only, with at most [`MAX_WAITING`] connections per VM waiting for its
//! worker to take them; workers report on pipes, which cannot carry descriptors; a worker that
//! has not exec'd within [`START_DEADLINE`] (a frozen cgroup) is killed and counts as a failed
//! start, and holds none of the supervisor's descriptors meanwhile; failed starts, and workers
//! that die while their VMM lives, back off per VMM ([`tenants::StartBackoff`]); exited
//! workers are reaped without waiting (a traced one later); every line a tenant can provoke
//! goes through its uid's log budget ([`tenants::TenantLog`]).
//!
//! ```text
//! accept ─▶ identify (SO_PEERCRED, SO_PEERGROUPS, SO_PEERPIDFD) ─▶ export allow-list
//!        ─▶ per-VMM cap ─▶ the VMM's live VM?
//!             yes ─▶ waiting bound ─▶ outbox ─▶ control socket ─▶ worker ─▶ report pipe: Accepted
//!             no  ─▶ backoff, per-uid cap, /proc agrees with the socket's credentials,
//!                    RLIMIT_NOFILE ─▶ fork (Starting) ─▶ exec'd (Running) ─▶ outbox flushed
//! ```
//!
//! Files: this one (the loop, accepting, identifying), `dispatch.rs` (connections to workers),
//! `lifecycle.rs` (starting, hearing from, retiring, reaping and stopping workers), `vm.rs` (the
//! VM table), `device_state.rs` (what a guest chose that its next worker must know), `spawn.rs`
//! (the fork and the child), `tenants.rs` (limits, backoff, log budgets), `control.rs` (the
//! control socket's requests and clients), `status.rs` (`vublk status`), `exports.rs` (`vublk
//! export add|remove|list`), `confine.rs` (each worker's sandbox plan), `worker_log.rs` (a worker's stderr into
//! our log), `metrics.rs` (`--metrics-addr`).

mod confine;
pub mod control;
mod device_state;
mod dispatch;
mod exports;
mod lifecycle;
mod metrics;
mod spawn;
mod state_store;
mod status;
mod tenants;
mod upgrade;
mod vm;
mod worker_log;

use std::collections::HashMap;
use std::ffi::CString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::endpoint::{AcceptFailure, Endpoint, EndpointError, Listener, SocketAccess};
use crate::event_loop::{self, EventLoop, Token};
use crate::export::ExportSpec;
use crate::identity::Peer;
use crate::metrics::MetricsServer;
use crate::ratelimit::RateLimit;
use crate::signals::Signals;

pub use confine::WorkerOptions;
use control::ControlClients;
use device_state::DeviceState;
pub use exports::ExportDefaults;
use metrics::Counters;
use spawn::Executable;
pub use spawn::{adopt_channels, WORKER_CONTROL_FD};
use state_store::StateStore;
pub use status::{print_status, Status, VmStatus};
use tenants::{left_out, StartBackoff, TenantLog};
pub use tenants::{TenantLimits, DEFAULT_CONNECTIONS_PER_VMM, DEFAULT_VMS_PER_UID};
use vm::{Handoff, Vm};

/// Why the supervisor could not start, or its loop failed.
#[derive(Debug, Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot set up the event loop")]
    EventLoop(#[source] io::Error),
    #[error("cannot open the running binary (/proc/self/exe) to start workers from")]
    Executable(#[source] io::Error),
    #[error("cannot serve the connection on the inherited fd")]
    Connected(#[source] io::Error),
    #[error("waiting for events failed")]
    Wait(#[source] io::Error),
    #[error("cannot listen for metrics scrapes on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// What the supervisor's loop waits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    /// SIGINT or SIGTERM.
    Signal,
    /// A frontend connecting to the export at this index.
    Listener(usize),
    /// `vublk status` or `vublk export` connecting to the control socket.
    Control,
    /// Control connection `id` is readable (or writable, once its request is read).
    ControlClient(u64),
    /// The report pipe of VM `id`'s worker is readable.
    WorkerReports(u64),
    /// The worker of VM `id` exited (its pidfd).
    WorkerExit(u64),
    /// The starting worker of VM `id` exec'd or failed (its exec-status pipe).
    WorkerStart(u64),
    /// The full control socket of VM `id`'s worker has room again, or the worker closed it
    /// (watched only while it is full).
    WorkerWritable(u64),
    /// The stderr pipe of VM `id`'s worker is readable.
    WorkerLog(u64),
    /// A scraper connecting to `--metrics-addr`.
    MetricsListener,
    /// Metrics connection `id` is readable (or writable, once its request is read).
    MetricsClient(u64),
    /// The daemon started by `vublk upgrade` wrote to its readiness pipe, or exited.
    Upgrade,
}

impl Token for Event {
    fn to_raw(self) -> u64 {
        match self {
            Event::Signal => event_loop::pack(0, 0),
            Event::Listener(index) => event_loop::pack(1, index as u64),
            Event::WorkerReports(id) => event_loop::pack(2, id),
            Event::WorkerExit(id) => event_loop::pack(3, id),
            Event::Control => event_loop::pack(4, 0),
            Event::WorkerStart(id) => event_loop::pack(5, id),
            Event::WorkerWritable(id) => event_loop::pack(6, id),
            Event::WorkerLog(id) => event_loop::pack(7, id),
            Event::MetricsListener => event_loop::pack(8, 0),
            Event::MetricsClient(id) => event_loop::pack(9, id),
            Event::ControlClient(id) => event_loop::pack(10, id),
            Event::Upgrade => event_loop::pack(11, 0),
        }
    }

    fn from_raw(raw: u64) -> Option<Event> {
        Some(match event_loop::unpack(raw) {
            (0, 0) => Event::Signal,
            (1, index) => Event::Listener(index as usize),
            (2, id) => Event::WorkerReports(id),
            (3, id) => Event::WorkerExit(id),
            (4, 0) => Event::Control,
            (5, id) => Event::WorkerStart(id),
            (6, id) => Event::WorkerWritable(id),
            (7, id) => Event::WorkerLog(id),
            (8, 0) => Event::MetricsListener,
            (9, id) => Event::MetricsClient(id),
            (10, id) => Event::ControlClient(id),
            (11, 0) => Event::Upgrade,
            _ => return None,
        })
    }
}

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
    /// `None` once the export was removed (`vublk export remove`); the entry stays so the
    /// indexes connections carry keep naming the same export.
    listener: Option<Listener>,
    /// How state files name it: the path its listening socket is bound to, the same for
    /// the daemon that created the socket and one that inherited it (an upgrade, systemd);
    /// else its name.
    state_key: String,
}

impl Export {
    fn new(spec: ExportSpec, listener: Listener) -> Export {
        let state_key = listener
            .bound_path()
            .map_or_else(|| spec.name.clone(), |p| p.display().to_string());
        Export {
            spec,
            listener: Some(listener),
            state_key,
        }
    }
}

/// Where the supervisor answers, besides its exports.
#[derive(Debug, Default, Clone)]
pub struct ControlOptions {
    /// `vublk status` (--control-socket).
    pub control_socket: Option<PathBuf>,
    /// `GET /metrics` (--metrics-addr).
    pub metrics_addr: Option<SocketAddr>,
    /// What exports added at run time take from the daemon-wide options.
    pub export_defaults: ExportDefaults,
    /// Where the guests' write-cache choices are kept for the next daemon (--state-dir);
    /// `None`: `vublk-state` beside the first export's socket.
    pub state_dir: Option<PathBuf>,
}

pub fn run(
    exports: Vec<(Endpoint, ExportSpec)>,
    limits: TenantLimits,
    workers: WorkerOptions,
    options: ControlOptions,
) -> Result<(), SupervisorError> {
    // Before anything opens a descriptor: sockets passed by systemd or by the daemon this one
    // replaces (`vublk upgrade`) sit at fds 3 on.
    let named: Vec<i32> = exports
        .iter()
        .filter_map(|(endpoint, _)| match endpoint {
            Endpoint::Fd(fd) => Some(*fd),
            Endpoint::Path(_) => None,
        })
        .collect();
    let inherited = crate::endpoint::inherited::take_from_environment(&named);
    if inherited > 0 {
        tracing::info!("{inherited} descriptor(s) inherited (LISTEN_FDS)");
    }
    let signals = Signals::block_and_watch().map_err(SupervisorError::EventLoop)?;
    raise_nofile_limit();
    let exe = Executable::current().map_err(SupervisorError::Executable)?;
    // What `vublk upgrade` starts by default: the binary at the path this one was started
    // from (an upgrade replaces the file there), with the same arguments.
    let binary = std::env::current_exe().map_err(SupervisorError::Executable)?;
    let argv: Vec<CString> = std::env::args_os()
        .filter_map(|a| CString::new(a.into_encoded_bytes()).ok())
        .collect();
    // Before the control socket, whose appearance says vublk is ready.
    let metrics = options
        .metrics_addr
        .map(|addr| {
            MetricsServer::bind(addr).map_err(|source| SupervisorError::Metrics { addr, source })
        })
        .transpose()?;
    let (open, control) = open_sockets(exports, options.control_socket)?;
    let mut supervisor = Supervisor::new(open, exe, limits, workers)?;
    supervisor.export_defaults = options.export_defaults;
    supervisor.binary = binary;
    supervisor.argv = argv;
    supervisor.state = open_state_store(options.state_dir, &supervisor.exports);
    if let Some(server) = &metrics {
        if let Ok(addr) = server.local_addr() {
            tracing::info!("serving metrics on http://{addr}/metrics");
        }
        supervisor
            .events
            .watch(server.listener(), Event::MetricsListener)
            .map_err(SupervisorError::EventLoop)?;
    }
    supervisor.metrics = metrics;
    supervisor
        .events
        .watch(&signals, Event::Signal)
        .map_err(SupervisorError::EventLoop)?;
    if let Some(Listener::Listening { listener, .. }) = &control {
        listener
            .set_nonblocking(true)
            .map_err(SupervisorError::EventLoop)?;
        supervisor
            .events
            .watch(listener, Event::Control)
            .map_err(SupervisorError::EventLoop)?;
    }
    supervisor.control = control;
    crate::endpoint::inherited::notify_ready();
    let result = supervisor.serve(&signals);
    if let Some(pending) = supervisor.upgrade.take() {
        // Stopped before the new daemon was ready: it must not serve sockets this one is
        // about to remove.
        let binary = pending.binary.clone();
        let ended = pending.end();
        tracing::warn!(
            "upgrade to {} abandoned: this daemon is stopping ({ended})",
            binary.display()
        );
    }
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
) -> Result<(Vec<Export>, Option<Listener>), EndpointError> {
    let mut open = Vec::new();
    let bind_all = || -> Result<Option<Listener>, EndpointError> {
        for (endpoint, spec) in exports {
            let listener = endpoint.open(spec.socket)?;
            open.push(Export::new(spec, listener));
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
            open.iter()
                .filter_map(|export| export.listener.as_ref())
                .for_each(Listener::cleanup);
            Err(e)
        }
    }
}

/// The state directory (`--state-dir`, else `vublk-state` beside the first export's socket),
/// swept of files of VMMs that are gone; `None` (said in one line) if there is none or it is
/// not usable: choices then last only as long as this daemon.
fn open_state_store(dir: Option<PathBuf>, exports: &[Export]) -> Option<StateStore> {
    let dir = dir.or_else(|| {
        let socket = exports
            .iter()
            .find_map(|e| e.listener.as_ref()?.bound_path())?;
        Some(socket.parent()?.join("vublk-state"))
    });
    let Some(dir) = dir else {
        tracing::info!("no state directory (no --state-dir, no socket path): the guests' write-cache choices last as long as this daemon");
        return None;
    };
    match StateStore::open(&dir) {
        Ok(store) => {
            store.sweep();
            tracing::info!(
                "keeping the guests' write-cache choices in {}",
                dir.display()
            );
            Some(store)
        }
        Err(e) => {
            tracing::warn!(
                "state directory {}: {}; the guests' write-cache choices last as long as this daemon",
                dir.display(),
                crate::error_line(&e)
            );
            None
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
    events: EventLoop<Event>,
    exports: Vec<Export>,
    exe: Executable,
    vms: HashMap<u64, Vm>,
    next_vm: u64,
    next_connection: u64,
    /// Exports whose endpoint was one connected socket, still being served.
    connected_left: usize,
    /// Where `vublk status` and `vublk export` ask, and their connections.
    control: Option<Listener>,
    control_clients: ControlClients,
    export_defaults: ExportDefaults,
    limits: TenantLimits,
    /// What workers' sandboxes allow besides their exports.
    workers: WorkerOptions,
    /// A worker reported that the kernel has no landlock (said once).
    told_no_landlock: bool,
    backoff: StartBackoff,
    log: TenantLog,
    /// What the VMs' guests chose that their next worker must know.
    device_state: DeviceState,
    /// The same choices on disk, for the next daemon.
    state: Option<StateStore>,
    /// A descriptor given up when accept fails for lack of them, so the connection can be
    /// taken and closed instead of waking the loop again and again.
    reserve: Option<OwnedFd>,
    /// Lines about the supervisor itself running short (no tenant to charge them to).
    overload_log: RateLimit,
    /// Workers that exited but could not be reaped yet (their tenant traces them), and when
    /// to try again.
    unreaped: Vec<(i32, OwnedFd)>,
    reap_retry_at: Option<Instant>,
    /// Where scrapers connect (--metrics-addr), and what the supervisor counts for them.
    metrics: Option<MetricsServer>,
    counters: Counters,
    /// What `vublk upgrade` starts, and the new daemon it started, until it is ready.
    binary: PathBuf,
    argv: Vec<CString>,
    upgrade: Option<upgrade::Pending>,
    /// A new daemon serves the sockets now: stop the workers and exit.
    handed_over: bool,
}

impl Supervisor {
    fn new(
        exports: Vec<Export>,
        exe: Executable,
        limits: TenantLimits,
        workers: WorkerOptions,
    ) -> Result<Supervisor, SupervisorError> {
        let events = EventLoop::new().map_err(SupervisorError::EventLoop)?;
        let mut supervisor = Supervisor {
            events,
            exports,
            exe,
            vms: HashMap::new(),
            next_vm: 1,
            next_connection: 1,
            connected_left: 0,
            control: None,
            control_clients: ControlClients::default(),
            export_defaults: ExportDefaults::default(),
            limits,
            workers,
            told_no_landlock: false,
            backoff: StartBackoff::default(),
            log: TenantLog::default(),
            device_state: DeviceState::default(),
            state: None,
            reserve: open_reserve(),
            overload_log: RateLimit::new(5, Duration::from_secs(10)),
            unreaped: Vec::new(),
            reap_retry_at: None,
            metrics: None,
            counters: Counters::default(),
            binary: PathBuf::new(),
            argv: Vec::new(),
            upgrade: None,
            handed_over: false,
        };
        for index in 0..supervisor.exports.len() {
            let stream = match &supervisor.exports[index].listener {
                None => continue,
                Some(Listener::Listening { listener, .. }) => {
                    // Level-triggered: a connection that went away before accept must not block it.
                    listener
                        .set_nonblocking(true)
                        .map_err(SupervisorError::EventLoop)?;
                    supervisor
                        .events
                        .watch(listener, Event::Listener(index))
                        .map_err(SupervisorError::EventLoop)?;
                    continue;
                }
                Some(Listener::Connected(s)) => {
                    s.try_clone().map_err(SupervisorError::Connected)?
                }
            };
            supervisor.connected_left += 1;
            supervisor.hand_over(index, stream);
        }
        Ok(supervisor)
    }

    /// Whether every export is a connected socket (`--fd`): the daemon ends with the last.
    /// Exports all removed at run time leave it running, for the next `vublk export add`.
    fn only_connected(&self) -> bool {
        let mut live = self.exports.iter().filter_map(|e| e.listener.as_ref());
        live.clone().next().is_some() && live.all(|l| matches!(l, Listener::Connected(_)))
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

    /// When the loop must wake up next without an event: the earliest start deadline, send
    /// retry, reap retry or metrics connection deadline.
    fn next_deadline(&self) -> Option<Instant> {
        self.vms
            .values()
            .filter_map(|vm| vm.deadline())
            .chain(self.reap_retry_at)
            .chain(self.metrics.as_ref().and_then(|m| m.next_deadline()))
            .chain(self.control_clients.next_deadline())
            .chain(self.upgrade.as_ref().map(|u| u.deadline))
            .min()
    }

    fn serve(&mut self, signals: &Signals) -> Result<(), SupervisorError> {
        loop {
            if self.only_connected() && self.connected_left == 0 || self.handed_over {
                return Ok(());
            }
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            let ready = self.events.wait(timeout).map_err(SupervisorError::Wait)?;
            for event in ready {
                match event {
                    Event::Signal => {
                        tracing::info!("{} received, stopping", signals.read());
                        return Ok(());
                    }
                    Event::Listener(index) => self.accept(index),
                    Event::WorkerReports(id) => {
                        self.on_reports(id);
                    }
                    // Room to send, or the worker's end closed (flush then retires it).
                    Event::WorkerWritable(id) => self.flush(id),
                    Event::WorkerStart(id) => self.on_worker_start(id),
                    Event::WorkerExit(id) => self.reap(id),
                    Event::WorkerLog(id) => self.on_worker_log(id),
                    Event::Control => self.on_control_listener(),
                    Event::ControlClient(id) => self.on_control_client(id),
                    Event::MetricsListener => self.on_metrics_listener(),
                    Event::MetricsClient(id) => self.on_metrics_client(id),
                    Event::Upgrade => self.on_upgrade(),
                }
            }
            self.expire_upgrade(Instant::now());
            self.expire(Instant::now());
            self.expire_metrics(Instant::now());
            for id in self.control_clients.overdue(Instant::now()) {
                self.control_clients.close(id);
            }
        }
    }

    fn accept(&mut self, index: usize) {
        let Some(Listener::Listening { listener, .. }) = &self.exports[index].listener else {
            return;
        };
        match listener.accept() {
            Ok((stream, _)) => self.hand_over(index, stream),
            Err(e) if AcceptFailure::of(&e) == AcceptFailure::NoDescriptors => self.shed(index),
            Err(e) if AcceptFailure::of(&e) == AcceptFailure::Nothing => {}
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
        let Some(Listener::Listening { listener, .. }) = &self.exports[index].listener else {
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
                sandbox: vm.sandbox.clone(),
                seccomp: status::seccomp_of(vm.worker_pid),
            })
            .collect();
        vms.sort_by_key(|vm| vm.vmm_pid);
        Status {
            exports: self
                .exports
                .iter()
                .filter(|e| e.listener.is_some())
                .map(|e| e.spec.name.clone())
                .collect(),
            vms,
        }
    }

    fn on_control_listener(&mut self) {
        let Some(Listener::Listening { listener, .. }) = &self.control else {
            return;
        };
        if let Some((id, stream)) = self.control_clients.accept(listener, Instant::now()) {
            if self.events.watch(stream, Event::ControlClient(id)).is_err() {
                self.control_clients.close(id);
            }
        }
    }

    /// A control connection is ready: read its request, answer it (a status, or an export
    /// change), write what fits.
    fn on_control_client(&mut self, id: u64) {
        let mut next = self.control_clients.on_ready(id);
        if let control::Next::Answer(request) = next {
            let request = if request.is_empty() {
                Ok(control::Request::Status)
            } else {
                serde_json::from_slice::<control::Request>(&request)
            };
            let answer = match request {
                Ok(control::Request::Status) => serde_json::to_vec(&self.status()),
                Ok(control::Request::Upgrade { binary }) => match self.start_upgrade(id, binary) {
                    // Answered once the new daemon is ready or failed.
                    None => return,
                    Some(reply) => serde_json::to_vec(&reply),
                },
                Ok(control::Request::Counters) => serde_json::to_vec(&self.snapshot()),
                Ok(request) => serde_json::to_vec(&self.export_request(request)),
                Err(e) => serde_json::to_vec(&control::ExportReply::Err(format!(
                    "bad control request: {e}"
                ))),
            };
            next = self.control_clients.answer(id, answer.unwrap_or_default());
        }
        self.watch_control_client(id, next);
    }

    fn watch_control_client(&mut self, id: u64, next: control::Next) {
        if next != control::Next::Write {
            return;
        }
        if let Some(stream) = self.control_clients.stream(id) {
            // Watched for room to write now that the request is read.
            self.events.unwatch(stream);
            if self
                .events
                .watch_writable(stream, Event::ControlClient(id))
                .is_err()
            {
                self.control_clients.close(id);
            }
        }
    }
}

fn open_reserve() -> Option<OwnedFd> {
    rustix::fs::open(
        "/dev/null",
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant comes back as itself, whatever its id: two watched descriptors never
    /// share a token.
    #[test]
    fn event_tokens_round_trip() {
        let ids = [0, 1, u64::from(u32::MAX) + 1, (1 << 56) - 1];
        let mut events = vec![
            Event::Signal,
            Event::Control,
            Event::MetricsListener,
            Event::Upgrade,
        ];
        for id in ids {
            events.extend([
                Event::Listener(id as usize),
                Event::WorkerReports(id),
                Event::WorkerExit(id),
                Event::WorkerStart(id),
                Event::WorkerWritable(id),
                Event::WorkerLog(id),
                Event::MetricsClient(id),
                Event::ControlClient(id),
            ]);
        }
        for event in events {
            assert_eq!(Event::from_raw(event.to_raw()), Some(event), "{event:?}");
        }
        assert_eq!(Event::from_raw(event_loop::pack(0, 1)), None);
        assert_eq!(Event::from_raw(event_loop::pack(8, 1)), None);
        assert_eq!(Event::from_raw(event_loop::pack(11, 1)), None);
        assert_eq!(Event::from_raw(event_loop::pack(12, 0)), None);
    }
}
