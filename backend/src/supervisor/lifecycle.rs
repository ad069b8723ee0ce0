//! Workers' lives, seen from the supervisor: started without waiting for them (the exec-status
//! pipe is watched, with a deadline), heard from on their report pipes, retired, reaped without
//! blocking (a worker its tenant traces is reaped once the tracer lets go), and stopped.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::handoff::{ReportReader, ToSupervisor};
use crate::identity::{IdentityError, Peer, VmmIdentity};

use super::spawn::{exec_outcome, spawn_worker, ExecFailure, ExecOutcome, SpawnError};
use super::vm::{exited, Handoff, Vm, WorkerState, REPORT_BURST, REPORT_INTERVAL};
use super::worker_log::{LineLevel, WorkerLog};
use super::{Event, Level, Supervisor, START_DEADLINE, STOP_GRACE, WORKER_MIN_NOFILE};
use crate::ratelimit::RateLimit;

/// A worker that served this long before it died was a success: its VMM's earlier failures
/// are forgotten, and the crash is retried at once.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// Reports read per wake-up from one worker, so a chatty worker cannot hold the loop.
const REPORTS_PER_WAKEUP: usize = 16;
/// How often to try again to reap a worker that exited but could not be reaped yet (its
/// tenant traces it).
pub(super) const REAP_RETRY: Duration = Duration::from_secs(1);

/// Why no worker was started for a connection.
#[derive(Debug, Error)]
pub(super) enum StartError {
    /// The VMM exited meanwhile: nothing to report.
    #[error("the VMM exited")]
    Gone,
    /// The VMM's identity cannot be read or is not one a worker may take on (its credentials
    /// changed, say).
    #[error(transparent)]
    Identity(IdentityError),
    #[error(
        "RLIMIT_NOFILE {nofile} of VMM pid {pid} is below the {WORKER_MIN_NOFILE} a worker needs"
    )]
    TooFewFiles { nofile: u64, pid: i32 },
    /// The supervisor had no descriptor or memory left to read the VMM's identity with.
    #[error(transparent)]
    IdentityUnread(IdentityError),
    #[error("cannot duplicate the VMM's pidfd")]
    VmmPidfd(#[source] io::Error),
    #[error("cannot fork a worker")]
    Spawn(#[source] SpawnError),
    #[error("cannot watch the new worker")]
    Watch(#[source] io::Error),
}

impl StartError {
    /// Whether the supervisor ran short (descriptors, memory, processes) rather than the VMM
    /// being at fault: such a failure does not count against the VMM.
    pub fn is_supervisors(&self) -> bool {
        matches!(
            self,
            StartError::IdentityUnread(_)
                | StartError::VmmPidfd(_)
                | StartError::Spawn(_)
                | StartError::Watch(_)
        )
    }
}

/// Why a VMM's worker failed; counted against the VMM.
#[derive(Debug, Error)]
pub(super) enum WorkerFailure {
    #[error(transparent)]
    Start(StartError),
    #[error("worker pid {pid}")]
    Exec {
        pid: i32,
        #[source]
        failure: ExecFailure,
    },
    #[error("worker pid {pid} did not start within {} s (is the VMM's cgroup frozen?); killed", START_DEADLINE.as_secs())]
    StartTimeout { pid: i32 },
    #[error("worker pid {pid} exited before taking a connection ({exit})")]
    DiedFirst { pid: i32, exit: Exit },
}

/// How a worker ended, as far as the supervisor can tell.
#[derive(Debug)]
pub(super) enum Exit {
    Code(i32),
    Signal(i32),
    /// `waitid` failed.
    Unknown(io::Error),
    /// It exited, but its tracer has not let go of it, so it cannot be reaped yet.
    NotReapedYet,
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(code) => write!(f, "exit {code}"),
            Exit::Signal(libc::SIGSYS) => write!(
                f,
                "killed by SIGSYS: a system call its seccomp filter forbids"
            ),
            Exit::Signal(signal) => write!(f, "killed by signal {signal}"),
            Exit::Unknown(e) => write!(f, "status unknown: {e}"),
            Exit::NotReapedYet => write!(f, "exited; not reaped yet (traced?)"),
        }
    }
}

impl Supervisor {
    /// Reads the VMM's identity, checks a worker can live with it, and forks the worker. It
    /// does not wait for the child: `on_worker_start` and `expire` see how it went.
    pub(super) fn start(&mut self, peer: &Peer) -> Result<u64, StartError> {
        let identity = match VmmIdentity::read_for(peer) {
            Ok(identity) => identity,
            Err(IdentityError::Gone(_)) => return Err(StartError::Gone),
            Err(e @ IdentityError::Read { .. }) if is_shortage(&e) => {
                return Err(StartError::IdentityUnread(e))
            }
            Err(e) => return Err(StartError::Identity(e)),
        };
        if let Some(nofile) = identity
            .soft_limit(libc::RLIMIT_NOFILE)
            .filter(|&n| n < WORKER_MIN_NOFILE)
        {
            return Err(StartError::TooFewFiles {
                nofile,
                pid: peer.pid,
            });
        }
        let vmm_pidfd = peer.pidfd.try_clone().map_err(StartError::VmmPidfd)?;
        let plan = super::confine::plan_for(&self.exports, &self.workers, peer);
        let worker = spawn_worker(&identity, &self.exe, &plan).map_err(StartError::Spawn)?;
        let id = self.next_vm;
        self.next_vm += 1;
        let watched = self
            .events
            .watch(&worker.reports, Event::WorkerReports(id))
            .and_then(|()| self.events.watch(&worker.pidfd, Event::WorkerExit(id)))
            .and_then(|()| self.events.watch(&worker.log, Event::WorkerLog(id)))
            .and_then(|()| {
                self.events
                    .watch(&worker.exec_status, Event::WorkerStart(id))
            });
        if let Err(e) = watched {
            kill(&worker.pidfd);
            self.events.unwatch(&worker.reports);
            self.events.unwatch(&worker.pidfd);
            self.events.unwatch(&worker.log);
            self.unreaped.push((worker.pid, worker.pidfd));
            return Err(StartError::Watch(e));
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
                vmm_pidfd,
                uid: peer.uid,
                gid: peer.gid,
                groups: peer.groups.clone(),
                worker_pid: worker.pid,
                worker_pidfd: worker.pidfd,
                started_at: Instant::now(),
                control: worker.control,
                reports: worker.reports,
                reader: ReportReader::default(),
                report_budget: RateLimit::new(REPORT_BURST, REPORT_INTERVAL),
                log: worker.log,
                log_reader: WorkerLog::default(),
                sandbox: None,
                state: WorkerState::Starting {
                    exec_status: worker.exec_status,
                    deadline: Instant::now() + START_DEADLINE,
                },
                live: HashMap::new(),
                outbox: VecDeque::new(),
                pending: Vec::new(),
                took_one: false,
                failure_counted: false,
                watching_writable: false,
                retry_send_at: None,
                identity,
                devices: Vec::new(),
                reported_at: None,
            },
        );
        Ok(id)
    }

    /// The exec-status pipe of a starting worker is readable: it exec'd, or failed.
    pub(super) fn on_worker_start(&mut self, id: u64) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let WorkerState::Starting { exec_status, .. } = &vm.state else {
            return;
        };
        match exec_outcome(exec_status) {
            ExecOutcome::Pending => {}
            ExecOutcome::Started => {
                self.counters.workers_started += 1;
                let starting = std::mem::replace(&mut vm.state, WorkerState::Running);
                self.stop_watching_start(starting);
                self.flush(id);
            }
            ExecOutcome::Failed(failure) => {
                let pid = vm.worker_pid;
                self.fail_start(id, WorkerFailure::Exec { pid, failure });
            }
        }
    }

    fn stop_watching_start(&self, state: WorkerState) {
        if let WorkerState::Starting { exec_status, .. } = state {
            self.events.unwatch(&exec_status);
        }
    }

    /// What is due without an event: workers that have not exec'd by their deadline are
    /// killed; sends the kernel had no memory for are tried again; exited workers that could
    /// not be reaped are tried again.
    pub(super) fn expire(&mut self, now: Instant) {
        let due: Vec<(u64, bool)> = self
            .vms
            .iter()
            .filter(|(_, vm)| vm.deadline().is_some_and(|d| d <= now))
            .map(|(id, vm)| (*id, matches!(vm.state, WorkerState::Starting { .. })))
            .collect();
        for (id, starting) in due {
            if !starting {
                if let Some(vm) = self.vms.get_mut(&id) {
                    vm.retry_send_at = None;
                }
                self.flush(id);
                continue;
            }
            let Some(vm) = self.vms.get(&id) else {
                continue;
            };
            kill(&vm.worker_pidfd);
            let pid = vm.worker_pid;
            self.fail_start(id, WorkerFailure::StartTimeout { pid });
        }
        if self.reap_retry_at.is_some_and(|at| at <= now) {
            self.reap_retry_at = None;
            self.reap_unreaped();
        }
    }

    /// A worker that will not start: retired, counted against its VMM, its connections closed.
    fn fail_start(&mut self, id: u64, failure: WorkerFailure) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let before = std::mem::replace(&mut vm.state, WorkerState::Retired);
        vm.failure_counted = true;
        let handoffs: Vec<Handoff> = vm.outbox.drain(..).chain(vm.pending.drain(..)).collect();
        let (key, uid, pid) = (vm.vmm_key, vm.uid, vm.vmm_pid);
        self.stop_watching_start(before);
        self.start_failed(key, uid, pid, &failure, handoffs);
    }

    /// The worker cannot take connections any more: the ones it was never sent go to a new
    /// worker now (it may never die, if its tenant keeps it stopped); the ones it was sent wait
    /// for it to take them or die.
    pub(super) fn retire(&mut self, id: u64) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let before = std::mem::replace(&mut vm.state, WorkerState::Retired);
        let unsent: Vec<Handoff> = vm.outbox.drain(..).collect();
        vm.retry_send_at = None;
        if std::mem::take(&mut vm.watching_writable) {
            self.events.unwatch(&vm.control);
        }
        self.stop_watching_start(before);
        for handoff in unsent {
            self.dispatch(handoff);
        }
    }

    /// The worker's report pipe is readable: take what it says. Returns whether there may be
    /// more to read now (it stopped at [`REPORTS_PER_WAKEUP`]).
    pub(super) fn on_reports(&mut self, id: u64) -> bool {
        let only_connected = self.only_connected();
        let Some(vm) = self.vms.get_mut(&id) else {
            return false;
        };
        let read = vm.reader.read(&vm.reports, REPORTS_PER_WAKEUP);
        let (worker, uid, pid) = (vm.worker_pid, vm.uid, vm.vmm_pid);
        let reports = match read {
            Ok(reports) => reports,
            Err(e) => {
                // A worker that cannot speak the protocol is broken or taken over: it goes.
                self.tenant_line(uid, Level::Warn, "worker-broken", || {
                    format!(
                        "worker pid {worker} of VMM pid {pid} sent a bad report ({}); killing it",
                        crate::error_line(&e)
                    )
                });
                self.kill_broken(id);
                return false;
            }
        };
        let more = reports.messages.len() == REPORTS_PER_WAKEUP && !reports.closed;
        let mut ended_here = 0;
        let mut chosen = Vec::new();
        for message in reports.messages {
            let Some(vm) = self.vms.get_mut(&id) else {
                return false;
            };
            if vm.report_budget.check(std::time::Instant::now()).is_none() {
                // More than any working worker sends: it is broken or taken over.
                self.tenant_line(uid, Level::Warn, "worker-broken", || {
                    format!("worker pid {worker} of VMM pid {pid} sent more than {REPORT_BURST} reports in {} s; killing it", REPORT_INTERVAL.as_secs())
                });
                self.kill_broken(id);
                return false;
            }
            // Nothing a worker says is taken on trust: it may only speak of the connections it
            // was given, and what it says goes no further than its own VM's entry.
            match message {
                ToSupervisor::Stats { mut devices } => {
                    // Only connections it serves count, as many as a VMM may hold.
                    devices.retain(|d| vm.live.contains_key(&d.connection));
                    devices.truncate(self.limits.connections_per_vmm);
                    vm.devices = devices;
                    vm.reported_at = Some(Instant::now());
                }
                ToSupervisor::Accepted { connection } => {
                    let before = vm.pending.len();
                    vm.pending.retain(|h| h.connection != connection);
                    vm.took_one |= vm.pending.len() < before;
                }
                ToSupervisor::Ended { connection } => {
                    tracing::debug!("connection {connection} ended (worker pid {worker})");
                    // A worker can only end what it was given.
                    if vm.live.remove(&connection).is_some() {
                        ended_here += 1;
                    }
                }
                ToSupervisor::WriteCache {
                    connection,
                    write_cache,
                } => {
                    // Only for a connection it serves: a worker speaks for its own VMM's
                    // devices, nobody else's.
                    if let Some(&export) = vm.live.get(&connection) {
                        chosen.push((vm.vmm_key, export, write_cache));
                    }
                }
                ToSupervisor::Refused {
                    connection,
                    export,
                    reason,
                } => {
                    if vm.live.remove(&connection).is_none() {
                        continue;
                    }
                    ended_here += 1;
                    // The worker's words are the tenant's: quoted, so they cannot forge lines.
                    self.tenant_line(uid, Level::Warn, "worker-refused", || {
                        format!("{export:?}: worker pid {worker} refused connection {connection} of VMM pid {pid}: {reason:?}")
                    });
                }
                ToSupervisor::Sandbox(sandbox) => {
                    if vm.sandbox.is_some() {
                        continue;
                    }
                    let unsupported = sandbox.landlock == "unsupported";
                    vm.sandbox = Some(sandbox);
                    if unsupported && !std::mem::replace(&mut self.told_no_landlock, true) {
                        tracing::warn!("the kernel has no landlock: workers can open any file their VMM's user can (said once)");
                    }
                }
                ToSupervisor::Forbidden { syscall } => {
                    // It is dying of SIGSYS, which its exit status will show (not killed here,
                    // so it does). A worker that says so and lives harms only its own VM.
                    let name = crate::sandbox::seccomp::name_of(syscall).unwrap_or("unknown");
                    self.tenant_line(uid, Level::Warn, "worker-forbidden", || {
                        format!("worker pid {worker} of VMM pid {pid} (uid {uid}) made system call {syscall} ({name}), which its seccomp filter forbids; it dies of SIGSYS")
                    });
                }
            }
        }
        if only_connected {
            self.connected_left = self.connected_left.saturating_sub(ended_here);
        }
        for (vmm, export, on) in chosen {
            let vms = &self.vms;
            let has_worker = |key| vms.values().any(|vm| vm.vmm_key == key);
            let kept = self
                .device_state
                .set_write_cache(vmm, export, on, has_worker);
            if let Some(state) = &self.state {
                state.set_write_cache(vmm, &self.exports[export].state_key, on);
            }
            tracing::debug!(
                "worker pid {worker}: the guest of VMM pid {pid} set the write cache of {} {}{}",
                self.exports[export].spec.name,
                if on { "on" } else { "off" },
                if kept {
                    ""
                } else {
                    " (not remembered: table full)"
                }
            );
        }
        if reports.closed {
            // The worker is exiting; its pidfd reports when it is gone.
            if let Some(vm) = self.vms.get(&id) {
                self.events.unwatch(&vm.reports);
            }
            self.retire(id);
        }
        more
    }

    /// Kills a worker that broke the protocol, stops listening to it, and retires it; its pidfd
    /// reports when it is gone.
    fn kill_broken(&mut self, id: u64) {
        if let Some(vm) = self.vms.get(&id) {
            kill(&vm.worker_pidfd);
            self.events.unwatch(&vm.reports);
        }
        self.retire(id);
    }

    /// The worker's stderr is readable: relays its lines into our log, prefixed, escaped and
    /// within its uid's budget for worker lines.
    pub(super) fn on_worker_log(&mut self, id: u64) {
        let Some(vm) = self.vms.get_mut(&id) else {
            return;
        };
        let (lines, closed) = vm.log_reader.read(&vm.log);
        if closed {
            self.events.unwatch(&vm.log);
        }
        let (worker, pid, uid) = (vm.worker_pid, vm.vmm_pid, vm.uid);
        self.relay(uid, worker, pid, lines);
    }

    /// Writes lines of worker `worker` (of VMM `pid`, uid `uid`) into our log.
    fn relay(&mut self, uid: u32, worker: i32, pid: i32, lines: Vec<super::worker_log::Line>) {
        for line in lines {
            let level = match line.level {
                LineLevel::Error | LineLevel::Warn => Level::Warn,
                LineLevel::Info => Level::Info,
                LineLevel::Debug => Level::Debug,
            };
            self.tenant_line(uid, level, "worker-log", || {
                format!("worker pid {worker} (VMM pid {pid}): {}", line.text)
            });
        }
    }

    /// The worker exited: reap it, count it against its VMM if that still lives, and hand
    /// the connections it never took to a new worker.
    pub(super) fn reap(&mut self, id: u64) {
        // What it reported before it went (an Accepted still in the pipe must not send its
        // connection to a second worker). Bounded: a process the worker forked may still hold
        // the pipe and write to it.
        for _ in 0..64 {
            if !self.on_reports(id) {
                break;
            }
        }
        // Its last words (bounded the same way).
        self.on_worker_log(id);
        let Some(mut vm) = self.vms.remove(&id) else {
            return;
        };
        self.events.unwatch(&vm.worker_pidfd);
        self.events.unwatch(&vm.reports);
        self.events.unwatch(&vm.log);
        if vm.watching_writable {
            self.events.unwatch(&vm.control);
        }
        if let WorkerState::Starting { exec_status, .. } = &vm.state {
            self.events.unwatch(exec_status);
        }
        let status = match try_reap(&vm.worker_pidfd) {
            Some(status) => status,
            None => {
                // Exited but not ours to reap yet: its tenant traces it. Try again later.
                self.unreaped.push((vm.worker_pid, vm.worker_pidfd));
                self.reap_retry_at
                    .get_or_insert(Instant::now() + REAP_RETRY);
                Exit::NotReapedYet
            }
        };
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
        let vmm_lives = !exited(&vm.vmm_pidfd);
        if !vmm_lives {
            // Its device state has no one to go to.
            self.device_state.forget(vm.vmm_key);
            if let Some(state) = &self.state {
                state.forget(vm.vmm_key);
            }
        }
        if !vm.failure_counted && !vm.took_one {
            // It died before taking a single connection: sending them to another worker would
            // only start the same failure again.
            let why = WorkerFailure::DiedFirst {
                pid: worker,
                exit: status,
            };
            return self.start_failed(vm.vmm_key, uid, pid, &why, left);
        }
        if !vm.failure_counted && vmm_lives {
            if vm.started_at.elapsed() >= STABLE_AFTER {
                self.backoff.forget(vm.vmm_key);
            }
            // Workers follow their VMM; one that goes first crashed or was killed. Its VMM may
            // reconnect, but a worker killed again and again backs off like a failed start.
            let next = self.count_failure(vm.vmm_key);
            self.tenant_line(uid, Level::Warn, "worker-died", || {
                format!("worker pid {worker} died while VMM pid {pid} (uid {uid}) lives ({status}); {next}")
            });
        }
        // Connections it never read: to a new worker, while their VMM lives.
        for handoff in left {
            if handoff.peer.exited() {
                self.connected_done(handoff.export);
                continue;
            }
            let connection = handoff.connection;
            self.tenant_line(uid, Level::Info, "handed-again", || {
                format!("connection {connection} was never taken by worker pid {worker}; handing it to a new worker")
            });
            self.dispatch(handoff);
        }
    }

    /// Reaps what could not be reaped before; keeps trying while some are left.
    fn reap_unreaped(&mut self) {
        self.unreaped.retain(|(pid, pidfd)| match try_reap(pidfd) {
            Some(status) => {
                tracing::debug!("worker pid {pid} reaped ({status})");
                false
            }
            None => true,
        });
        if !self.unreaped.is_empty() {
            self.reap_retry_at = Some(Instant::now() + REAP_RETRY);
        }
    }

    /// Closes every worker's control socket (workers stop their devices and exit), waits for
    /// them a while, kills stragglers, and removes the sockets we created.
    pub(super) fn stop(&mut self) {
        let deadline = Instant::now() + STOP_GRACE;
        let vms: Vec<Vm> = self.vms.drain().map(|(_, vm)| vm).collect();
        // After an upgrade the new daemon takes each VM as its QEMU reconnects: one at a
        // time, so they do not all reconnect (and start workers) at once.
        let one_at_a_time = self.handed_over;
        if one_at_a_time {
            tracing::info!(
                "handing over: stopping {} worker(s) one at a time, then exiting",
                vms.len()
            );
        }
        if !one_at_a_time {
            for vm in &vms {
                let _ = rustix::net::shutdown(&vm.control, rustix::net::Shutdown::Both);
            }
        }
        let mut stragglers = Vec::new();
        for mut vm in vms {
            let left = if one_at_a_time {
                let _ = rustix::net::shutdown(&vm.control, rustix::net::Shutdown::Both);
                STOP_GRACE
            } else {
                deadline.saturating_duration_since(Instant::now())
            };
            let exited = wait_exit(&vm.worker_pidfd, left);
            // Its last words (a count of lines it left out, say).
            let (lines, _) = vm.log_reader.read(&vm.log);
            self.relay(vm.uid, vm.worker_pid, vm.vmm_pid, lines);
            if exited {
                match try_reap(&vm.worker_pidfd) {
                    Some(status) => {
                        tracing::info!("worker pid {} exited ({status})", vm.worker_pid)
                    }
                    None => tracing::info!("worker pid {} exited (not reaped)", vm.worker_pid),
                }
            } else {
                tracing::warn!(
                    "worker pid {} did not stop in time; killing it",
                    vm.worker_pid
                );
                kill(&vm.worker_pidfd);
                stragglers.push(vm);
            }
        }
        // A child frozen in its cgroup dies only once thawed: wait a moment for them all, not
        // for each.
        let deadline = Instant::now() + Duration::from_secs(1);
        for vm in stragglers {
            let left = deadline.saturating_duration_since(Instant::now());
            match wait_exit(&vm.worker_pidfd, left)
                .then(|| try_reap(&vm.worker_pidfd))
                .flatten()
            {
                Some(status) => tracing::info!("worker pid {} exited ({status})", vm.worker_pid),
                None => tracing::warn!(
                    "worker pid {} is not gone after SIGKILL (frozen, or traced); leaving it",
                    vm.worker_pid
                ),
            }
        }
        for listener in self.exports.iter().filter_map(|e| e.listener.as_ref()) {
            listener.cleanup();
        }
        if let Some(control) = &self.control {
            control.cleanup();
        }
    }
}

/// Whether reading the VMM's identity failed for the supervisor running short rather than
/// for something about the VMM.
fn is_shortage(e: &IdentityError) -> bool {
    matches!(
        e,
        IdentityError::Read { source, .. } if matches!(
            source.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::EAGAIN)
        )
    )
}

pub(super) fn kill(pidfd: &OwnedFd) {
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
pub(super) fn wait_exit(pidfd: &OwnedFd, timeout: Duration) -> bool {
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

/// Reaps our child behind `pidfd` if it can be reaped now (never waits: a child its tenant
/// traces cannot be until the tracer lets go); describes how it ended.
fn try_reap(pidfd: &OwnedFd) -> Option<Exit> {
    // SAFETY: an all-zero siginfo_t is valid for waitid to fill.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child's pidfd, filling the local.
    let ret = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        )
    };
    if ret != 0 {
        return Some(Exit::Unknown(io::Error::last_os_error()));
    }
    // SAFETY: waitid filled a SIGCHLD siginfo, or left it zeroed (nothing to reap).
    let (pid, code, status) = unsafe { (info.si_pid(), info.si_code, info.si_status()) };
    if pid == 0 {
        return None;
    }
    Some(match code {
        libc::CLD_EXITED => Exit::Code(status),
        _ => Exit::Signal(status),
    })
}
