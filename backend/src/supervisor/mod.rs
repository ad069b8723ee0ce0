//! The supervisor: owns the sockets, identifies the VMM behind each connection, and hands the
//! connection to that VM's worker, spawning the worker on the VM's first connection. It never
//! maps guest memory. It is single-threaded (one epoll loop), which is what lets it fork
//! workers safely.
//!
//! A VM is keyed by its VMM's pid and start time, held by a pidfd: a recycled pid is a new VM.

mod spawn;
mod tenants;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::cli::{ExportSpec, OpenAs};
use crate::daemon::{DaemonError, Endpoint, Listener, SocketAccess};
use crate::disk::{Disk, DiskSpec};
use crate::handoff::{self, DeviceStatus, ToSupervisor, ToWorker};
use crate::identity::{Peer, VmmIdentity};

pub use spawn::{adopt_control, WORKER_CONTROL_FD};
pub use tenants::{TenantLimits, DEFAULT_CONNECTIONS_PER_VMM, DEFAULT_VMS_PER_UID};
use spawn::{spawn_worker, Executable};

/// epoll tokens: the signalfd, listeners (by export index), workers (by worker id).
const EV_SIGNAL: u64 = 0;
const EV_LISTENER: u64 = 1 << 32;
const EV_WORKER_CONTROL: u64 = 2 << 32;
const EV_WORKER_EXIT: u64 = 3 << 32;
const EV_CONTROL: u64 = 4 << 32;
const TOKEN_MASK: u64 = (1 << 32) - 1;

/// How long workers get to stop their devices when the supervisor is told to stop.
const STOP_GRACE: Duration = Duration::from_secs(10);

struct Export {
    spec: ExportSpec,
    listener: Listener,
}

/// One VM: its VMM and the worker serving it.
struct Vm {
    vmm_pid: i32,
    vmm_key: (i32, u64),
    worker_pid: i32,
    worker_pidfd: OwnedFd,
    control: OwnedFd,
    /// Connections handed over and not yet ended.
    connections: usize,
    identity: VmmIdentity,
    /// The worker's last report.
    devices: Vec<DeviceStatus>,
    /// The worker cannot take connections (it died, or is exiting): new connections of this
    /// VMM go to a new worker; its pidfd still reports when it is gone, and `reap` clears it.
    retired: bool,
    /// Connections sent to the worker that it has not acknowledged yet; if it dies first,
    /// they go to a new worker.
    pending: Vec<Handoff>,
}

/// A connection on its way to a worker. The supervisor keeps its copy of the socket until the
/// worker acknowledges it: a worker killed just before reading the message (the VMM then
/// reconnects at once, as cloud-hypervisor does) must not take the connection with it.
struct Handoff {
    connection: u64,
    export: usize,
    stream: OwnedFd,
    peer: Peer,
}

pub fn run(exports: Vec<(Endpoint, ExportSpec)>, limits: TenantLimits, control_socket: Option<PathBuf>) -> Result<(), DaemonError> {
    let signals = crate::daemon::Signals::block_and_watch().map_err(DaemonError::EventLoop)?;
    let exe = Executable::current().map_err(DaemonError::EventLoop)?;
    let (open, control) = open_sockets(exports, control_socket)?;
    let mut supervisor = Supervisor::new(open, exe)?;
    supervisor.limits = limits;
    supervisor.watch(signals.as_raw_fd(), EV_SIGNAL).map_err(DaemonError::EventLoop)?;
    if let Some(Listener::Listening { listener, .. }) = &control {
        supervisor.watch(listener.as_raw_fd(), EV_CONTROL).map_err(DaemonError::EventLoop)?;
    }
    supervisor.control = control;
    let result = supervisor.serve(&signals);
    supervisor.stop();
    result
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
            open.push(Export { listener: endpoint.open(spec.socket)?, spec });
        }
        // The status socket shows every VM's identity: owner only.
        let owner_only = SocketAccess { mode: Some(0o600), group: None };
        control_socket.map(|path| Endpoint::Path(path).open(owner_only)).transpose()
    };
    match bind_all() {
        Ok(control) => Ok((open, control)),
        Err(e) => {
            open.iter().for_each(|export| export.listener.cleanup());
            Err(e)
        }
    }
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
}

impl Supervisor {
    fn new(exports: Vec<Export>, exe: Executable) -> Result<Supervisor, DaemonError> {
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
            limits: TenantLimits::default(),
        };
        for index in 0..supervisor.exports.len() {
            let fd = match &supervisor.exports[index].listener {
                Listener::Listening { listener, .. } => Some(listener.as_raw_fd()),
                Listener::Connected(_) => None,
            };
            match fd {
                Some(fd) => supervisor.watch(fd, EV_LISTENER | index as u64).map_err(DaemonError::EventLoop)?,
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
        epoll::ctl(self.epoll, epoll::ControlOptions::EPOLL_CTL_ADD, fd, epoll::Event::new(epoll::Events::EPOLLIN, token))
    }

    fn unwatch(&self, fd: i32) {
        let _ = epoll::ctl(self.epoll, epoll::ControlOptions::EPOLL_CTL_DEL, fd, epoll::Event::new(epoll::Events::empty(), 0));
    }

    fn only_connected(&self) -> bool {
        self.exports.iter().all(|e| matches!(e.listener, Listener::Connected(_)))
    }

    fn serve(&mut self, signals: &crate::daemon::Signals) -> Result<(), DaemonError> {
        let mut events = [epoll::Event::new(epoll::Events::empty(), 0); 16];
        loop {
            if self.only_connected() && self.connected_left == 0 {
                return Ok(());
            }
            let n = match epoll::wait(self.epoll, -1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(DaemonError::EventLoop(e)),
            };
            for event in events[..n].iter().copied() {
                let token = event.data;
                match token & !TOKEN_MASK {
                    EV_SIGNAL if token == EV_SIGNAL => {
                        tracing::info!("{} received, stopping", signals.read());
                        return Ok(());
                    }
                    EV_LISTENER => self.accept((token & TOKEN_MASK) as usize),
                    EV_WORKER_CONTROL => self.on_worker_message(token & TOKEN_MASK),
                    EV_WORKER_EXIT => self.reap(token & TOKEN_MASK),
                    EV_CONTROL => self.answer_status(),
                    _ => {}
                }
            }
        }
    }

    fn accept(&mut self, index: usize) {
        let Listener::Listening { listener, .. } = &self.exports[index].listener else { return };
        match listener.accept() {
            Ok((stream, _)) => self.hand_over(index, stream),
            Err(e) => {
                tracing::warn!("accept on {} failed: {e}", self.exports[index].spec.name);
                if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    /// Identifies the VMM behind `stream` and passes the connection to its worker.
    fn hand_over(&mut self, index: usize, stream: UnixStream) {
        let peer = match Peer::of(&stream) {
            Ok(peer) => peer,
            Err(e) => {
                tracing::warn!("{}: cannot identify the frontend: {e}; connection closed", self.exports[index].spec.name);
                self.connected_done(index);
                return;
            }
        };
        let connection = self.next_connection;
        self.next_connection += 1;
        self.dispatch(Handoff { connection, export: index, stream: OwnedFd::from(stream), peer });
    }

    /// Sends a connection to the worker of its VMM, starting one if there is none (or the one
    /// there is cannot take it).
    fn dispatch(&mut self, handoff: Handoff) {
        let index = handoff.export;
        let name = self.exports[index].spec.name.clone();
        let connection = handoff.connection;
        let spec = self.exports[index].spec.clone();
        let disk = match (spec.open_as, &spec.disk) {
            (OpenAs::Daemon, DiskSpec::Path(path)) => match Disk::open_file(path, spec.open) {
                Ok(file) => Some(OwnedFd::from(file)),
                Err(e) => {
                    tracing::error!("{name}: {}; connection closed", crate::error_line(&e));
                    self.connected_done(index);
                    return;
                }
            },
            _ => None,
        };
        let message = ToWorker::Serve { connection, export: spec, disk_fd_attached: disk.is_some() };
        let key = (handoff.peer.pid, handoff.peer.start_time);
        for attempt in 0..2 {
            let live = self.vms.iter().find(|(_, vm)| vm.vmm_key == key && !vm.retired).map(|(id, _)| *id);
            let vm_id = match live {
                Some(id) => id,
                None => match self.spawn(&handoff.peer) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::error!(
                            "{name}: cannot start a worker for VMM pid {} (uid {}): {e}; connection closed",
                            handoff.peer.pid,
                            handoff.peer.uid
                        );
                        self.connected_done(index);
                        return;
                    }
                },
            };
            let Some(vm) = self.vms.get_mut(&vm_id) else { return };
            let mut fds = vec![&handoff.stream, &handoff.peer.pidfd];
            if let Some(disk) = &disk {
                fds.push(disk);
            }
            match handoff::send(&vm.control, &message, &fds) {
                Ok(()) => {
                    vm.connections += 1;
                    tracing::info!(
                        "{name}: connection {connection} from VMM pid {} (uid {}) handed to worker pid {}",
                        vm.vmm_pid,
                        handoff.peer.uid,
                        vm.worker_pid
                    );
                    vm.pending.push(handoff);
                    return;
                }
                Err(e) => {
                    let again = if attempt == 0 { "; starting a new worker" } else { "" };
                    tracing::warn!("{name}: worker pid {} cannot take connection {connection} ({e}){again}", vm.worker_pid);
                    vm.retired = true;
                }
            }
        }
        tracing::error!("{name}: connection {connection} closed: no worker could take it");
        self.connected_done(index);
    }

    /// A connection of `export` will not be served (counts down a `--fd` connected socket).
    fn connected_done(&mut self, export: usize) {
        if matches!(self.exports[export].listener, Listener::Connected(_)) {
            self.connected_left = self.connected_left.saturating_sub(1);
        }
    }

    fn spawn(&mut self, peer: &Peer) -> io::Result<u64> {
        let identity = VmmIdentity::read(peer.pid).map_err(|e| io::Error::other(crate::error_line(&e)))?;
        if peer.exited() {
            return Err(io::Error::other("the VMM exited"));
        }
        let worker = spawn_worker(&identity, &self.exe)?;
        let id = self.next_vm;
        self.next_vm += 1;
        self.watch(worker.control.as_raw_fd(), EV_WORKER_CONTROL | id)?;
        self.watch(worker.pidfd.as_raw_fd(), EV_WORKER_EXIT | id)?;
        tracing::info!(
            "VMM pid {} (uid {} gid {}): worker pid {} started in {} cgroup(s)",
            peer.pid,
            identity.ids.uid[1],
            identity.ids.gid[1],
            worker.pid,
            identity.cgroup_procs.len()
        );
        self.vms.insert(
            id,
            Vm {
                vmm_pid: peer.pid,
                vmm_key: (peer.pid, peer.start_time),
                worker_pid: worker.pid,
                worker_pidfd: worker.pidfd,
                control: worker.control,
                connections: 0,
                identity,
                devices: Vec::new(),
                retired: false,
                pending: Vec::new(),
            },
        );
        Ok(id)
    }

    fn on_worker_message(&mut self, id: u64) {
        let only_connected = self.only_connected();
        let Some(vm) = self.vms.get_mut(&id) else { return };
        let message = handoff::recv::<ToSupervisor>(&vm.control);
        match message {
            Ok(Some((ToSupervisor::Stats { devices }, _))) => {
                vm.devices = devices;
                return;
            }
            Ok(Some((ToSupervisor::Accepted { connection }, _))) => {
                vm.pending.retain(|h| h.connection != connection);
                return;
            }
            Ok(Some((ToSupervisor::Ended { connection }, _))) => {
                tracing::debug!("connection {connection} ended (worker pid {})", vm.worker_pid);
            }
            Ok(Some((ToSupervisor::Refused { connection, export, reason }, _))) => {
                tracing::error!("{export}: worker pid {} refused connection {connection}: {reason}", vm.worker_pid);
            }
            Ok(None) | Err(_) => {
                // The worker is exiting; its pidfd reports when it is gone.
                vm.retired = true;
                let fd = vm.control.as_raw_fd();
                self.unwatch(fd);
                return;
            }
        }
        vm.connections = vm.connections.saturating_sub(1);
        if only_connected {
            self.connected_left = self.connected_left.saturating_sub(1);
        }
    }

    fn reap(&mut self, id: u64) {
        let Some(mut vm) = self.vms.remove(&id) else { return };
        self.unwatch(vm.worker_pidfd.as_raw_fd());
        self.unwatch(vm.control.as_raw_fd());
        let status = wait_pidfd(&vm.worker_pidfd);
        tracing::info!("worker pid {} for VMM pid {} exited ({status})", vm.worker_pid, vm.vmm_pid);
        let pending = std::mem::take(&mut vm.pending);
        if self.only_connected() {
            self.connected_left = self.connected_left.saturating_sub(vm.connections.saturating_sub(pending.len()));
        }
        // Connections it never read: to a new worker, while their VMM lives.
        for handoff in pending {
            if handoff.peer.exited() {
                self.connected_done(handoff.export);
                continue;
            }
            tracing::info!(
                "connection {} was never taken by worker pid {}; handing it to a new worker",
                handoff.connection,
                vm.worker_pid
            );
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
            let mut pfd = libc::pollfd { fd: vm.worker_pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: polls one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) };
            if ready == 0 {
                tracing::warn!("worker pid {} did not stop in time; killing it", vm.worker_pid);
                // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
                unsafe { libc::syscall(libc::SYS_pidfd_send_signal, vm.worker_pidfd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<libc::siginfo_t>(), 0) };
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
                cgroups: vm.identity.cgroups.iter().map(|c| format!("{}:{}", c.controllers.join(","), c.path)).collect(),
                limits: vm.identity.limits.clone(),
                devices: vm.devices.clone(),
            })
            .collect();
        vms.sort_by_key(|vm| vm.vmm_pid);
        Status { exports: self.exports.iter().map(|e| e.spec.name.clone()).collect(), vms }
    }

    fn answer_status(&mut self) {
        let Some(Listener::Listening { listener, .. }) = &self.control else { return };
        let Ok((mut stream, _)) = listener.accept() else { return };
        // A client that does not read must not stall the supervisor for long.
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let body = serde_json::to_vec(&self.status()).unwrap_or_default();
        let _ = std::io::Write::write_all(&mut stream, &body);
    }
}

/// What `vublk status` shows.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub exports: Vec<String>,
    pub vms: Vec<VmStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VmStatus {
    pub vmm_pid: i32,
    pub worker_pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub cgroups: Vec<String>,
    /// The VMM's limits; the worker keeps ours where the VMM's hard limit is above them.
    pub limits: Vec<crate::identity::proc::Limit>,
    pub devices: Vec<DeviceStatus>,
}

/// `vublk status`: asks the supervisor behind `control` and prints the answer.
pub fn print_status(control: &std::path::Path, json: bool) -> io::Result<()> {
    let mut stream = UnixStream::connect(control)?;
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut body)?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let status: Status = serde_json::from_slice(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    println!("exports: {}", status.exports.join(", "));
    if status.vms.is_empty() {
        println!("no VMs connected");
    }
    for vm in &status.vms {
        println!(
            "VMM pid {}  worker pid {}  uid {} gid {} groups {:?}",
            vm.vmm_pid, vm.worker_pid, vm.uid, vm.gid, vm.groups
        );
        println!("  cgroups: {}", vm.cgroups.join("  "));
        let show = |v: Option<u64>| v.map_or("unlimited".to_string(), |n| n.to_string());
        let limits: Vec<String> = vm.limits.iter().map(|l| format!("{}={}/{}", l.name.trim_start_matches("Max "), show(l.soft), show(l.hard))).collect();
        println!("  limits: {}", limits.join(", "));
        for d in &vm.devices {
            println!(
                "  device {} (connection {}): {} queue(s), {} requests, {} errors, {} bytes read, {} bytes written",
                d.export, d.connection, d.queues, d.totals.requests, d.totals.errors, d.totals.bytes_read, d.totals.bytes_written
            );
            let t = &d.totals;
            println!(
                "    queue threads: {} request(s) done inline, {} kick(s), {} interrupt(s), polled {} time(s) ({} found work, {} ms)",
                t.inline,
                t.kicks,
                t.calls,
                t.polls,
                t.poll_hits,
                t.poll_ns / 1_000_000
            );
            println!(
                "    polling policy: {} epoch(s) polling ({} ms), {} sleeping ({} ms)",
                t.polling_epochs,
                t.polling_epoch_ns / 1_000_000,
                t.sleeping_epochs,
                t.sleeping_epoch_ns / 1_000_000
            );
            let m = &d.memory;
            let live: Vec<String> = m.live.iter().map(|(id, pins)| format!("{id} ({pins} pins)")).collect();
            println!(
                "    memory: generation {}, live {}, {} retire wait(s), longest {} us, {} cancelled",
                m.generation,
                live.join(", "),
                m.retire_waits,
                m.longest_retire_wait_us,
                m.cancelled
            );
        }
    }
    Ok(())
}

/// Reaps the child behind `pidfd`; describes how it ended.
fn wait_pidfd(pidfd: &OwnedFd) -> String {
    // SAFETY: an all-zero siginfo_t is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pidfd, filling the local.
    let ret = unsafe { libc::waitid(libc::P_PIDFD, pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED) };
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
