//! Identifying the VMM at the other end of a unix socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use super::proc;

/// SO_PEERPIDFD (Linux 6.5): a pidfd for the process that connected.
const SO_PEERPIDFD: libc::c_int = 77;

/// The process behind a connection, pinned by a pidfd.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// With the pid, names the process for the system's lifetime; a recycled pid has another.
    pub start_time: u64,
    pub pidfd: OwnedFd,
}

impl Peer {
    /// The peer of `stream`: SO_PEERCRED, and a pidfd from SO_PEERPIDFD where the kernel has
    /// it, else from pidfd_open checked against the start time so a recycled pid is refused.
    pub fn of(stream: &UnixStream) -> io::Result<Peer> {
        let (pid, uid, gid) = peer_credentials(stream)?;
        if pid == 0 {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the frontend is outside vublk's pid namespace, so its worker cannot take its identity: run vublk in the VMM's pid namespace (podman --pid=host, a Pod's shareProcessNamespace) or with --single-process",
            ));
        }
        let start_before = start_time(pid)?;
        let pidfd = match peer_pidfd(stream) {
            Ok(fd) => fd,
            Err(_) => pidfd_open(pid)?,
        };
        // The pidfd pins the process; if the pid was recycled between SO_PEERCRED and here,
        // the start time changed.
        let start_after = start_time(pid)?;
        if start_before != start_after {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("peer pid {pid} was reused")));
        }
        let pidfd_pid = pid_of_pidfd(&pidfd)?;
        if pidfd_pid != pid {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("peer pid {pid} exited (pidfd names {pidfd_pid})")));
        }
        Ok(Peer { pid, uid, gid, start_time: start_after, pidfd })
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        let mut pfd = libc::pollfd { fd: self.pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one valid pollfd without blocking.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready != 0
    }
}

/// SO_PEERCRED: pid, uid and gid of the process that connected. The pid is 0 when that process
/// is in a pid namespace ours cannot see (a VMM on the host of a containerised vublk).
fn peer_credentials(stream: &UnixStream) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills at most `len` bytes of `cred`, a plain C struct.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid, cred.gid))
}

fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    proc::parse_stat_start_time(&stat).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc/PID/stat"))
}

fn peer_pidfd(stream: &UnixStream) -> io::Result<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `fd` and its size into `len`.
    let ret = unsafe {
        libc::getsockopt(stream.as_fd().as_raw_fd(), libc::SOL_SOCKET, SO_PEERPIDFD, (&mut fd as *mut libc::c_int).cast(), &mut len)
    };
    if ret != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new pidfd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes scalars and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The pid a pidfd refers to, from /proc/self/fdinfo (-1 once it exited).
fn pid_of_pidfd(pidfd: &OwnedFd) -> io::Result<i32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "pidfd without Pid in fdinfo"))
}
