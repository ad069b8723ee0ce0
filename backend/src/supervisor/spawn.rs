//! Creating a per-VM worker: fork, become the VMM (identity/apply.rs), exec `vublk` again in
//! worker mode with the control socket as fd 3.
//!
//! Spawning never waits for the child: a child that joins a frozen cgroup, or is stopped by
//! its tenant, stops before exec. The supervisor watches the exec-status pipe in its event
//! loop ([`exec_outcome`]) and kills a child that has not exec'd by its deadline.
//!
//! The supervisor is single-threaded, so the forked child may run ordinary code (allocate,
//! open files) before exec: no other thread can hold a lock it would need. The binary is
//! executed through an fd opened at start-up (execveat AT_EMPTY_PATH), so the VMM's user needs
//! no permission on the directories above it. The child gets /dev/null at fds 0 and 1, its log
//! pipe at 2 (worker_log.rs relays it), its control socket at 3, its report pipe at 4, and until
//! exec its exec-status pipe and the binary; it closes the rest of the supervisor's descriptors
//! before it does anything else. Then it enters the namespaces of its sandbox (while it still
//! has the privilege to), takes on the VMM's identity, and execs the worker with its sandbox
//! plan on the command line (sandbox/).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};
use thiserror::Error;

use crate::identity::apply::{self, ApplyError};
use crate::identity::{peer::pidfd_open, VmmIdentity};
use crate::sandbox::{namespaces, Plan};

/// The fd number the worker finds its control socket at; its report pipe is the next one.
pub const WORKER_CONTROL_FD: i32 = 3;
const WORKER_REPORTS_FD: i32 = WORKER_CONTROL_FD + 1;
/// Where the child keeps its exec-status pipe and the binary until exec (close-on-exec).
const CHILD_ERRORS_FD: i32 = WORKER_CONTROL_FD + 2;
const CHILD_EXE_FD: i32 = WORKER_CONTROL_FD + 3;

/// A forked worker, seen from the supervisor.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// The supervisor's end of the control socket, non-blocking, send-only (its receiving side
    /// is shut down).
    pub control: OwnedFd,
    /// The read end of the worker's report pipe, non-blocking.
    pub reports: OwnedFd,
    /// Readable once the child has exec'd (end of file) or failed (a message); non-blocking.
    pub exec_status: OwnedFd,
    /// The read end of the worker's stderr, non-blocking.
    pub log: OwnedFd,
}

/// Why no worker could be forked: the supervisor's own trouble (descriptors, memory,
/// processes), not the VMM's.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// fork() in a multi-threaded process may deadlock the child; the supervisor is
    /// single-threaded by design, so this is a bug, not a runtime condition.
    #[error("the supervisor has more than one thread; refusing to fork")]
    MultiThreaded,
    #[error("cannot create its channels")]
    Channels(#[source] io::Error),
    #[error(transparent)]
    Fork(io::Error),
    #[error("cannot open its pidfd")]
    Pidfd(#[source] io::Error),
}

/// Why a forked child did not become a worker, as it tells the supervisor on the exec-status
/// pipe (one line with the causes: the supervisor reads text, not this type).
#[derive(Debug, Error)]
enum ChildError {
    #[error("cannot put the worker's descriptors in place")]
    Descriptors(#[source] io::Error),
    #[error(transparent)]
    Identity(#[from] ApplyError),
    #[error("cannot write the sandbox plan")]
    Plan(#[source] serde_json::Error),
    #[error("cannot exec the worker")]
    Exec(#[source] io::Error),
}

/// What the exec-status pipe says.
#[derive(Debug)]
pub enum ExecOutcome {
    /// Nothing yet.
    Pending,
    /// The child exec'd the worker.
    Started,
    /// The child failed before exec.
    Failed(ExecFailure),
}

/// Why a child did not exec.
#[derive(Debug, Error)]
pub enum ExecFailure {
    /// In the child's words: the step and why (a `ChildError` on one line).
    #[error("{0}")]
    Child(String),
    #[error("cannot read the exec status")]
    Unreadable(#[source] io::Error),
}

/// Reads the exec-status pipe without blocking. The child writes its one message (shorter
/// than PIPE_BUF, so in one piece) and exits; exec closes the pipe without a message.
pub fn exec_outcome(exec_status: &OwnedFd) -> ExecOutcome {
    let mut buf = [0u8; 2048];
    match rustix::io::read(exec_status, &mut buf) {
        Ok(0) => ExecOutcome::Started,
        Ok(n) => ExecOutcome::Failed(ExecFailure::Child(
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => ExecOutcome::Pending,
        Err(e) => ExecOutcome::Failed(ExecFailure::Unreadable(e.into())),
    }
}

/// The running binary, kept open to exec workers from.
pub struct Executable(OwnedFd);

impl Executable {
    pub fn current() -> io::Result<Executable> {
        let fd = rustix::fs::open(
            "/proc/self/exe",
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        Ok(Executable(fd))
    }
}

pub(super) fn threads_of_self() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Forks a worker that carries `identity` in the sandbox `plan`, without waiting for it to exec.
pub fn spawn_worker(
    identity: &VmmIdentity,
    exe: &Executable,
    plan: &Plan,
) -> Result<Spawned, SpawnError> {
    if threads_of_self() != 1 {
        return Err(SpawnError::MultiThreaded);
    }
    let Channels {
        ours,
        theirs,
        reports_read,
        reports_write,
        errors_read,
        errors_write,
        log_read,
        log_write,
        null,
    } = Channels::new().map_err(SpawnError::Channels)?;
    let env = environment(|_| true);
    let mut env_ptrs: Vec<*mut libc::c_char> = env.iter().map(|a| a.as_ptr().cast_mut()).collect();
    env_ptrs.push(std::ptr::null_mut());
    // SAFETY: getpid cannot fail.
    let supervisor = unsafe { libc::getpid() };

    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(SpawnError::Fork(io::Error::last_os_error()));
    }
    if pid == 0 {
        let sources = [
            &theirs,
            &reports_write,
            &errors_write,
            &exe.0,
            &null,
            &log_write,
        ]
        .map(|fd| fd.as_raw_fd());
        let (failure, errors) = match place_descriptors(sources) {
            Err(e) => (ChildError::Descriptors(e), errors_write.as_raw_fd()),
            Ok(()) => (
                child(identity, supervisor, plan, &env_ptrs),
                CHILD_ERRORS_FD,
            ),
        };
        let message = crate::error_line(&failure);
        // SAFETY: writes our own buffer to our pipe, then leaves without running destructors
        // or atexit handlers that belong to the supervisor.
        unsafe {
            libc::write(errors, message.as_ptr().cast(), message.len());
            libc::_exit(127);
        }
    }
    drop(theirs);
    drop(reports_write);
    drop(errors_write);
    drop(log_write);
    drop(null);
    // Our own unreaped child: the pid cannot have been recycled.
    let pidfd = match pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(e) => {
            // SAFETY: kills and reaps our own child, which cannot be waited for otherwise.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(SpawnError::Pidfd(e));
        }
    };
    Ok(Spawned {
        pid,
        pidfd,
        control: ours,
        reports: reports_read,
        exec_status: errors_read,
        log: log_read,
    })
}

/// Both ends of a new worker's channels: the control socket (ours send-only and
/// non-blocking), the report pipe, the exec-status pipe and the log pipe (our read ends
/// non-blocking); and /dev/null for its stdin and stdout.
struct Channels {
    ours: OwnedFd,
    theirs: OwnedFd,
    reports_read: OwnedFd,
    reports_write: OwnedFd,
    errors_read: OwnedFd,
    errors_write: OwnedFd,
    log_read: OwnedFd,
    log_write: OwnedFd,
    null: OwnedFd,
}

impl Channels {
    fn new() -> io::Result<Channels> {
        let (ours, theirs) = socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        // The worker reports on a pipe: nothing it sends can carry a descriptor to us.
        rustix::net::shutdown(&ours, rustix::net::Shutdown::Read)?;
        let (reports_read, reports_write) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (errors_read, errors_write) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let (log_read, log_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
        let null = rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        rustix::io::ioctl_fionbio(&errors_read, true)?;
        rustix::io::ioctl_fionbio(&reports_read, true)?;
        rustix::io::ioctl_fionbio(&log_read, true)?;
        rustix::io::ioctl_fionbio(&ours, true)?;
        Ok(Channels {
            ours,
            theirs,
            reports_read,
            reports_write,
            errors_read,
            errors_write,
            log_read,
            log_write,
            null,
        })
    }
}

/// In the child: puts the control socket, the report pipe, the exec-status pipe and the
/// binary at fds 3 to 6, /dev/null at 0 and 1 and the log pipe at 2, and closes every other
/// descriptor now, not at exec: a child that joins a frozen cgroup stops before exec, and must
/// not keep other VMs' connections (or the listeners) open meanwhile.
fn place_descriptors(sources: [i32; 6]) -> io::Result<()> {
    let targets = [
        WORKER_CONTROL_FD,
        WORKER_REPORTS_FD,
        CHILD_ERRORS_FD,
        CHILD_EXE_FD,
        0,
        2,
    ];
    let check = |ret: i32| {
        if ret < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(ret)
        }
    };
    let mut above = [0; 6];
    // SAFETY: fcntl, dup2 and close_range on descriptors of this (forked, single-threaded)
    // process, which owns them all.
    unsafe {
        // First out of the way of the targets, so no dup2 below overwrites a source still needed.
        for (high, source) in above.iter_mut().zip(sources) {
            *high = check(libc::fcntl(source, libc::F_DUPFD_CLOEXEC, CHILD_EXE_FD + 1))?;
        }
        for (high, target) in above.into_iter().zip(targets) {
            // dup2 clears close-on-exec on the target.
            check(libc::dup2(high, target))?;
        }
        // stdout is /dev/null too.
        check(libc::dup2(above[4], 1))?;
        for only_until_exec in [CHILD_ERRORS_FD, CHILD_EXE_FD] {
            check(libc::fcntl(
                only_until_exec,
                libc::F_SETFD,
                libc::FD_CLOEXEC,
            ))?;
        }
        check(libc::close_range(CHILD_EXE_FD as u32 + 1, u32::MAX, 0))?;
    }
    Ok(())
}

/// The child's side, once its descriptors are in place: only returns on failure.
fn child(
    identity: &VmmIdentity,
    supervisor: i32,
    plan: &Plan,
    env: &[*mut libc::c_char],
) -> ChildError {
    let mut plan = plan.clone();
    plan.namespaces = namespaces::enter(plan.profile);
    let plan = match serde_json::to_string(&plan) {
        Ok(plan) => plan,
        Err(e) => return ChildError::Plan(e),
    };
    let args: Vec<CString> = [
        "vublk",
        "--worker-control-fd",
        "3",
        "--worker-sandbox",
        plan.as_str(),
    ]
    .iter()
    .filter_map(|a| CString::new(*a).ok())
    .collect();
    let mut argv: Vec<*mut libc::c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    match apply::apply(identity, supervisor) {
        Ok(applied) => {
            for note in applied.notes {
                tracing::info!("worker for VMM pid {}: {note}", identity.pid);
            }
        }
        Err(e) => return ChildError::Identity(e),
    }
    // SAFETY: argv and env are NUL-terminated arrays of pointers to live CStrings; the binary
    // is open at CHILD_EXE_FD. execveat only returns on failure.
    unsafe {
        libc::execveat(
            CHILD_EXE_FD,
            c"".as_ptr(),
            argv.as_ptr(),
            env.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    ChildError::Exec(io::Error::last_os_error())
}

/// Takes ownership of the control socket the supervisor put at fd `fd` and the report pipe
/// at the next one.
///
/// # Safety
/// Only in a worker process, once: fds `fd` and `fd + 1` must be the control socket and the
/// report pipe, which nothing else owns.
pub unsafe fn adopt_channels(fd: i32) -> (OwnedFd, OwnedFd) {
    // SAFETY: guaranteed by the caller.
    unsafe { (OwnedFd::from_raw_fd(fd), OwnedFd::from_raw_fd(fd + 1)) }
}

/// This process's environment as `execve` takes it (`KEY=VALUE`), the variables `keep` picks
/// (by name); a variable with a NUL byte cannot be passed and is left out.
pub(super) fn environment(keep: impl Fn(&[u8]) -> bool) -> Vec<CString> {
    std::env::vars_os()
        .filter(|(k, _)| keep(k.as_encoded_bytes()))
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect()
}
