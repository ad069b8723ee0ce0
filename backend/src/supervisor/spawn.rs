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
//! no permission on the directories above it. Everything but fds 0-3 is close-on-exec.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use rustix::net::{socketpair, AddressFamily, SocketFlags, SocketType};

use crate::identity::{apply, peer::pidfd_open, VmmIdentity};

/// The fd number the worker finds its control socket at.
pub const WORKER_CONTROL_FD: i32 = 3;

/// A forked worker, seen from the supervisor.
pub struct Spawned {
    pub pid: i32,
    pub pidfd: OwnedFd,
    /// The supervisor's end of the control socket, non-blocking.
    pub control: OwnedFd,
    /// Readable once the child has exec'd (end of file) or failed (a message); non-blocking.
    pub exec_status: OwnedFd,
}

/// What the exec-status pipe says.
#[derive(Debug, PartialEq, Eq)]
pub enum ExecOutcome {
    /// Nothing yet.
    Pending,
    /// The child exec'd the worker.
    Started,
    /// The child failed before exec: the step and why.
    Failed(String),
}

/// Reads the exec-status pipe without blocking. The child writes its one message (shorter
/// than PIPE_BUF, so in one piece) and exits; exec closes the pipe without a message.
pub fn exec_outcome(exec_status: &OwnedFd) -> ExecOutcome {
    let mut buf = [0u8; 2048];
    match rustix::io::read(exec_status, &mut buf) {
        Ok(0) => ExecOutcome::Started,
        Ok(n) => ExecOutcome::Failed(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => ExecOutcome::Pending,
        Err(e) => ExecOutcome::Failed(format!("cannot read the exec status: {e}")),
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

fn threads_of_self() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Threads:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Forks a worker that carries `identity`, without waiting for it to exec.
pub fn spawn_worker(identity: &VmmIdentity, exe: &Executable) -> io::Result<Spawned> {
    if threads_of_self() != 1 {
        // fork() in a multi-threaded process may deadlock the child; the supervisor is
        // single-threaded by design, so this is a bug, not a runtime condition.
        return Err(io::Error::other(
            "the supervisor has more than one thread; refusing to fork",
        ));
    }
    let (ours, theirs) = socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let (errors_read, errors_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::ioctl_fionbio(&errors_read, true)?;
    rustix::io::ioctl_fionbio(&ours, true)?;
    let argv: Vec<CString> = ["vublk", "--worker-control-fd", "3"]
        .iter()
        .map(|a| CString::new(*a).expect("no NUL in constant arguments"))
        .collect();
    let mut argv_ptrs: Vec<*mut libc::c_char> =
        argv.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv_ptrs.push(std::ptr::null_mut());
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut env_ptrs: Vec<*mut libc::c_char> = env.iter().map(|a| a.as_ptr().cast_mut()).collect();
    env_ptrs.push(std::ptr::null_mut());
    // SAFETY: getpid cannot fail.
    let supervisor = unsafe { libc::getpid() };

    // SAFETY: the process is single-threaded (checked above), so the child may run any code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let failure = child(identity, supervisor, &theirs, exe, &argv_ptrs, &env_ptrs);
        let message = failure.to_string();
        // SAFETY: writes our own buffer to our pipe, then leaves without running destructors
        // or atexit handlers that belong to the supervisor.
        unsafe {
            libc::write(
                errors_write.as_raw_fd(),
                message.as_ptr().cast(),
                message.len(),
            );
            libc::_exit(127);
        }
    }
    drop(theirs);
    drop(errors_write);
    // Our own unreaped child: the pid cannot have been recycled.
    let pidfd = match pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(e) => {
            // SAFETY: kills and reaps our own child, which cannot be waited for otherwise.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
            return Err(e);
        }
    };
    Ok(Spawned {
        pid,
        pidfd,
        control: ours,
        exec_status: errors_read,
    })
}

/// The child's side: only returns on failure.
fn child(
    identity: &VmmIdentity,
    supervisor: i32,
    control: &OwnedFd,
    exe: &Executable,
    argv: &[*mut libc::c_char],
    env: &[*mut libc::c_char],
) -> Box<dyn std::error::Error> {
    // The control socket becomes fd 3, kept across exec; everything else above it closes.
    // SAFETY: dup2 and close_range on descriptors of this process.
    unsafe {
        if control.as_raw_fd() == WORKER_CONTROL_FD {
            // dup2 onto itself does nothing, close-on-exec included: clear it by hand.
            if libc::fcntl(WORKER_CONTROL_FD, libc::F_SETFD, 0) < 0 {
                return Box::new(io::Error::last_os_error());
            }
        } else if libc::dup2(control.as_raw_fd(), WORKER_CONTROL_FD) < 0 {
            return Box::new(io::Error::last_os_error());
        }
        if libc::close_range(
            WORKER_CONTROL_FD as u32 + 1,
            u32::MAX,
            libc::CLOSE_RANGE_CLOEXEC as i32,
        ) < 0
        {
            return Box::new(io::Error::last_os_error());
        }
    }
    match apply::apply(identity, supervisor) {
        Ok(applied) => {
            for note in applied.notes {
                tracing::info!("worker for VMM pid {}: {note}", identity.pid);
            }
        }
        Err(e) => return Box::new(e),
    }
    // SAFETY: argv and env are NUL-terminated arrays of pointers to live CStrings; the exe fd
    // is open. execveat only returns on failure.
    unsafe {
        libc::execveat(
            exe.0.as_raw_fd(),
            c"".as_ptr(),
            argv.as_ptr(),
            env.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
    }
    Box::new(io::Error::last_os_error())
}

/// Takes ownership of the control socket the supervisor put at fd 3.
///
/// # Safety
/// Only in a worker process, once: fd `fd` must be the control socket nothing else owns.
pub unsafe fn adopt_control(fd: i32) -> OwnedFd {
    // SAFETY: guaranteed by the caller.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
