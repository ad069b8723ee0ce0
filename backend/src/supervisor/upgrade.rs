//! `vublk upgrade`: the running daemon starts a new binary on its own listening sockets and
//! hands its VMs over to it, without systemd and without the socket paths ever refusing a
//! connection.
//!
//! ```text
//! vublk upgrade ─▶ control socket ─▶ fork + exec BINARY with the daemon's own arguments and
//!                  its listening sockets (exports, control, metrics) as LISTEN_FDS, plus a
//!                  readiness pipe ("vublk-ready")
//! new daemon       takes the sockets bound to its --socket-path/--control-socket instead of
//!                  binding (endpoint/inherited.rs), then writes READY=1
//! old daemon       READY=1: answers the client, stops accepting (the new daemon accepts on
//!                  the same sockets), leaves the socket files alone, stops its workers one at
//!                  a time (each abandons what it has in flight to the VM's inflight region,
//!                  as on SIGTERM), and exits; each QEMU reconnects to the new daemon
//!                  no READY=1 within UPGRADE_DEADLINE, or the new daemon exits: killed if
//!                  need be, the client gets the reason, the old daemon goes on serving
//! ```
//!
//! The sockets are never closed by both daemons at once and never unbound: between the two,
//! connections wait in the sockets' backlog.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::endpoint::inherited::{CREATED_BY_VUBLK, METRICS_NAME, READY_NAME};
use crate::identity::peer::pidfd_open;

/// How long the new daemon has to say it is ready.
pub(super) const UPGRADE_DEADLINE: Duration = Duration::from_secs(4);
/// How long a new daemon that did not get ready is waited for once killed.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// How long the control client that asked for an upgrade is kept, from the new daemon's start:
/// until the outcome is known (the deadline, then the wait for the kill) and a second more to
/// take the answer, whatever the time it had left as a control client (it may have been slow
/// to send its request, or the daemon slow to read it). Finite, so that a client cannot hold
/// its slot for longer; one upgrade is under way at a time.
pub(super) const UPGRADE_CLIENT_HOLD: Duration =
    Duration::from_secs(UPGRADE_DEADLINE.as_secs() + KILL_WAIT.as_secs() + 1);

#[derive(Debug, Error)]
pub(super) enum UpgradeError {
    #[error("an upgrade is already under way")]
    Busy,
    #[error("the export {0} is a connected fd, which cannot be handed over")]
    Connected(String),
    #[error("the export on inherited {0} would be passed at another fd number; only --fd 3 (the first export) can be handed over")]
    FdNumber(String),
    #[error("cannot execute {}", .path.display())]
    NotExecutable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start it")]
    Start(#[source] io::Error),
    /// The supervisor is single-threaded by design (it forks); a bug, not a runtime condition.
    #[error("the supervisor has more than one thread; refusing to fork")]
    MultiThreaded,
}

/// A descriptor passed to the new daemon, and its LISTEN_FDNAMES name.
pub(super) struct Passed<'a> {
    pub fd: &'a dyn AsRawFd,
    pub name: &'static str,
}

impl<'a> Passed<'a> {
    pub fn socket(fd: &'a dyn AsRawFd, created: bool) -> Passed<'a> {
        Passed {
            fd,
            name: if created { CREATED_BY_VUBLK } else { "vublk" },
        }
    }

    pub fn metrics(fd: &'a dyn AsRawFd) -> Passed<'a> {
        Passed {
            fd,
            name: METRICS_NAME,
        }
    }
}

/// A new daemon started, not ready yet.
pub(super) struct Pending {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// The read end of its readiness pipe, non-blocking.
    pub ready: OwnedFd,
    pub binary: PathBuf,
    /// The control client waiting for the outcome.
    pub client: u64,
    pub deadline: Instant,
    said: Vec<u8>,
}

/// What the readiness pipe says.
pub(super) enum Readiness {
    Waiting,
    Ready,
    /// It closed the pipe (exited) without saying so.
    Gone,
}

impl Pending {
    pub fn poll(&mut self) -> Readiness {
        let mut buf = [0u8; 64];
        loop {
            match rustix::io::read(&self.ready, &mut buf) {
                Ok(0) => return Readiness::Gone,
                Ok(n) => {
                    if self.said.len() < 64 {
                        self.said.extend_from_slice(&buf[..n]);
                    }
                    if self.said.windows(7).any(|w| w == b"READY=1") {
                        return Readiness::Ready;
                    }
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return Readiness::Waiting,
            }
        }
    }

    /// Kills it (if it still runs) and reaps it; says how it ended.
    pub fn end(self) -> String {
        super::lifecycle::kill(&self.pidfd);
        super::lifecycle::wait_exit(&self.pidfd, KILL_WAIT);
        let mut status = 0;
        // SAFETY: waits for our own child, writing the local.
        let reaped = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG) };
        if reaped != self.pid {
            "its end is not known yet".into()
        } else if libc::WIFEXITED(status) {
            format!("exit status {}", libc::WEXITSTATUS(status))
        } else {
            format!("signal {}", libc::WTERMSIG(status))
        }
    }
}

/// Forks and execs `binary` with `argv` (ours), the descriptors `passed` at fds 3 on, and a
/// readiness pipe after them; does not wait for it.
pub(super) fn start(
    binary: &Path,
    argv: &[CString],
    passed: &[Passed<'_>],
    client: u64,
) -> Result<Pending, UpgradeError> {
    if super::spawn::threads_of_self() != 1 {
        return Err(UpgradeError::MultiThreaded);
    }
    rustix::fs::access(binary, rustix::fs::Access::EXEC_OK).map_err(|e| {
        UpgradeError::NotExecutable {
            path: binary.to_owned(),
            source: e.into(),
        }
    })?;
    let path =
        CString::new(binary.as_os_str().as_bytes()).map_err(|e| UpgradeError::NotExecutable {
            path: binary.to_owned(),
            source: io::Error::other(e),
        })?;
    let (ready_read, ready_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| UpgradeError::Start(e.into()))?;
    rustix::io::ioctl_fionbio(&ready_read, true).map_err(|e| UpgradeError::Start(e.into()))?;
    let mut fds: Vec<RawFd> = passed.iter().map(|p| p.fd.as_raw_fd()).collect();
    fds.push(ready_write.as_raw_fd());
    let names: Vec<&str> = passed.iter().map(|p| p.name).chain([READY_NAME]).collect();
    let mut env = super::spawn::environment(|name| !name.starts_with(b"LISTEN_"));
    env.extend(
        [
            format!("LISTEN_FDS={}", fds.len()),
            format!("LISTEN_FDNAMES={}", names.join(":")),
        ]
        .into_iter()
        .filter_map(|s| CString::new(s).ok()),
    );
    let argv_ptrs: Vec<*const libc::c_char> = argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();

    // SAFETY: the supervisor is single-threaded (it forks workers the same way), so the child
    // may run any code before exec.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(UpgradeError::Start(io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: in the child, which only places descriptors, sets its signal mask and its
        // environment, and execs or exits.
        unsafe { child(&path, &argv_ptrs, env, &fds) }
    }
    drop(ready_write);
    let pidfd = pidfd_open(pid).map_err(UpgradeError::Start)?;
    Ok(Pending {
        pid,
        pidfd,
        ready: ready_read,
        binary: binary.to_owned(),
        client,
        deadline: Instant::now() + UPGRADE_DEADLINE,
        said: Vec::new(),
    })
}

/// The forked child: `fds` to 3, 4, ... (through copies above that range, so none overwrites
/// another), every signal unblocked (the supervisor blocks SIGINT and SIGTERM for its
/// signalfd), LISTEN_PID set to its pid, then exec.
///
/// # Safety
///
/// Only in the child of a fork of a single-threaded process.
unsafe fn child(
    path: &CString,
    argv: &[*const libc::c_char],
    mut env: Vec<CString>,
    fds: &[RawFd],
) -> ! {
    let first = 3;
    let above = first + fds.len() as i32;
    let mut ok = true;
    let mut copies = Vec::with_capacity(fds.len());
    for &fd in fds {
        // SAFETY: duplicates a descriptor we hold.
        let copy = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, above) };
        ok &= copy >= 0;
        copies.push(copy);
    }
    for (i, &copy) in copies.iter().enumerate() {
        // SAFETY: dup2 onto a number of our own; the copy stays (close-on-exec).
        ok &= ok && unsafe { libc::dup2(copy, first + i as i32) } >= 0;
    }
    // SAFETY: empties a local set and installs it as the mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() };
    if let Ok(listen_pid) = CString::new(format!("LISTEN_PID={pid}")) {
        env.push(listen_pid);
    }
    let env_ptrs: Vec<*const libc::c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    if ok {
        // SAFETY: NUL-terminated path and NULL-terminated arrays of NUL-terminated strings, all
        // alive until exec replaces the process.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), env_ptrs.as_ptr()) };
    }
    // SAFETY: leaves without running the supervisor's destructors or atexit handlers.
    unsafe { libc::_exit(127) }
}

impl super::Supervisor {
    /// Starts the new daemon for control client `client`; `None` when the answer waits for it
    /// (the client is not watched meanwhile, and kept until [`UPGRADE_CLIENT_HOLD`] from now),
    /// else the answer.
    pub(super) fn start_upgrade(
        &mut self,
        client: u64,
        binary: Option<PathBuf>,
    ) -> Option<super::control::UpgradeReply> {
        let binary = binary.unwrap_or_else(|| self.binary.clone());
        match self.spawn_upgrade(client, &binary) {
            Ok(pending) => {
                tracing::info!(
                    "upgrade: started {} (pid {}); waiting for it to be ready",
                    binary.display(),
                    pending.pid
                );
                if let Err(e) = self.events.watch(&pending.ready, super::Event::Upgrade) {
                    let reason = format!("cannot watch the new daemon: {e}; {}", pending.end());
                    tracing::error!(
                        "upgrade to {} failed: {reason}; still serving",
                        binary.display()
                    );
                    return Some(Err(reason));
                }
                if let Some(stream) = self.control_clients.stream(client) {
                    self.events.unwatch(stream);
                }
                self.control_clients
                    .extend(client, Instant::now() + UPGRADE_CLIENT_HOLD);
                self.upgrade = Some(pending);
                None
            }
            Err(e) => {
                let reason = crate::error_line(&e);
                tracing::error!(
                    "upgrade to {} failed: {reason}; still serving",
                    binary.display()
                );
                Some(Err(reason))
            }
        }
    }

    fn spawn_upgrade(&self, client: u64, binary: &Path) -> Result<Pending, UpgradeError> {
        if self.upgrade.is_some() {
            return Err(UpgradeError::Busy);
        }
        let mut passed = Vec::new();
        for export in &self.exports {
            match &export.listener {
                Some(crate::endpoint::Listener::Listening { listener, created }) => {
                    // The new daemon's `--fd N` must find this socket at N: the first
                    // passed fd is 3.
                    let name = &export.spec.name;
                    if name.starts_with("fd:") && *name != format!("fd:{}", 3 + passed.len()) {
                        return Err(UpgradeError::FdNumber(name.clone()));
                    }
                    passed.push(Passed::socket(listener, created.is_some()))
                }
                Some(crate::endpoint::Listener::Connected(_)) => {
                    return Err(UpgradeError::Connected(export.spec.name.clone()))
                }
                None => {}
            }
        }
        if let Some(crate::endpoint::Listener::Listening { listener, created }) = &self.control {
            passed.push(Passed::socket(listener, created.is_some()));
        }
        if let Some(metrics) = &self.metrics {
            passed.push(Passed::metrics(metrics.listener()));
        }
        start(binary, &self.argv, &passed, client)
    }

    /// The new daemon's readiness pipe woke the loop.
    pub(super) fn on_upgrade(&mut self) {
        let Some(pending) = self.upgrade.as_mut() else {
            return;
        };
        match pending.poll() {
            Readiness::Waiting => {}
            Readiness::Ready => {
                let pending = self.upgrade.take().expect("checked above");
                self.events.unwatch(&pending.ready);
                tracing::info!(
                    "upgrade: {} (pid {}) is ready; handing the VMs over to it one at a time",
                    pending.binary.display(),
                    pending.pid
                );
                self.answer_upgrade(pending.client, Ok(pending.pid as u32));
                self.hand_over_to_new_daemon();
            }
            Readiness::Gone => {
                let pending = self.upgrade.take().expect("checked above");
                self.events.unwatch(&pending.ready);
                self.upgrade_failed(pending, "it exited before it was ready");
            }
        }
    }

    /// The new daemon did not get ready in time.
    pub(super) fn expire_upgrade(&mut self, now: Instant) {
        if self.upgrade.as_ref().is_some_and(|u| u.deadline <= now) {
            let pending = self.upgrade.take().expect("checked above");
            self.events.unwatch(&pending.ready);
            let why = format!("it was not ready within {} s", UPGRADE_DEADLINE.as_secs());
            self.upgrade_failed(pending, &why);
        }
    }

    fn upgrade_failed(&mut self, pending: Pending, why: &str) {
        let (client, binary, pid) = (pending.client, pending.binary.clone(), pending.pid);
        let ended = pending.end();
        let reason = format!(
            "the new daemon {} (pid {pid}): {why} ({ended}); this daemon goes on serving",
            binary.display()
        );
        tracing::error!("upgrade failed: {reason}");
        self.answer_upgrade(client, Err(reason));
    }

    fn answer_upgrade(&mut self, client: u64, reply: super::control::UpgradeReply) {
        let answer = serde_json::to_vec(&reply).unwrap_or_default();
        let next = self.control_clients.answer(client, answer);
        self.watch_control_client(client, next);
    }

    /// The new daemon accepts on the sockets from now on: this one stops watching them and
    /// will not remove their files; its loop ends and its workers stop one at a time.
    fn hand_over_to_new_daemon(&mut self) {
        for export in &mut self.exports {
            if let Some(crate::endpoint::Listener::Listening { listener, created }) =
                &mut export.listener
            {
                self.events.unwatch(listener);
                *created = None;
            }
        }
        if let Some(crate::endpoint::Listener::Listening { listener, created }) = &mut self.control
        {
            self.events.unwatch(listener);
            *created = None;
        }
        if let Some(metrics) = &self.metrics {
            self.events.unwatch(metrics.listener());
        }
        self.handed_over = true;
    }
}
