//! Identifying the VMM at the other end of a unix socket.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};

use thiserror::Error;

use super::proc;

/// SO_PEERPIDFD (Linux 6.5): a pidfd for the process that connected.
const SO_PEERPIDFD: libc::c_int = 77;

/// Test only (`--test-without-peer-pidfd`): behave as on a kernel without SO_PEERPIDFD.
static WITHOUT_PEER_PIDFD: AtomicBool = AtomicBool::new(false);

/// Makes [`Peer::of`] take the `pidfd_open` path, as on kernels before 6.5.
pub fn test_without_peer_pidfd() {
    WITHOUT_PEER_PIDFD.store(true, Ordering::Relaxed);
}

/// Why a connection's peer could not be identified.
#[derive(Debug, Error)]
pub enum PeerError {
    #[error("cannot read the peer's credentials")]
    Credentials(#[source] io::Error),
    #[error("the frontend is outside vublk's pid namespace, so its worker cannot take its identity: run vublk in the VMM's pid namespace (podman --pid=host, a Pod's shareProcessNamespace) or with --single-process")]
    OtherPidNamespace,
    #[error("the frontend (pid {0}) exited before it was identified")]
    Exited(i32),
    #[error("cannot get a pidfd for the frontend (pid {pid})")]
    Pidfd {
        pid: i32,
        #[source]
        source: io::Error,
    },
}

/// The process behind a connection as the kernel recorded it at connect: its credentials
/// (SO_PEERCRED, SO_PEERGROUPS) and the process itself, pinned by a pidfd.
#[derive(Debug)]
pub struct Peer {
    pub pid: i32,
    /// The effective uid and gid at connect.
    pub uid: u32,
    pub gid: u32,
    /// The supplementary groups at connect.
    pub groups: Vec<u32>,
    /// With the pid, names the process for the system's lifetime; a recycled pid has another.
    pub start_time: u64,
    pub pidfd: OwnedFd,
}

impl Peer {
    /// The peer of `stream`. The pidfd comes from SO_PEERPIDFD, which names the process that
    /// connected or fails if it is gone. Only a kernel without it (ENOPROTOOPT, before 6.5)
    /// gets `pidfd_open(pid)`, checked against the start time around it, which cannot tell a
    /// pid recycled before the call: there the uid and gid checks of
    /// [`super::VmmIdentity::read_for`] are what stops a stranger's process.
    pub fn of(stream: &UnixStream) -> Result<Peer, PeerError> {
        let (pid, uid, gid) = peer_credentials(stream).map_err(PeerError::Credentials)?;
        if pid == 0 {
            return Err(PeerError::OtherPidNamespace);
        }
        let groups = peer_groups(stream).map_err(PeerError::Credentials)?;
        let gone = |_| PeerError::Exited(pid);
        let pidfd = match peer_pidfd(stream) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => open_checked(pid)?,
            // ESRCH or EINVAL: the process that connected has exited.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::EINVAL)) => {
                return Err(PeerError::Exited(pid))
            }
            Err(source) => return Err(PeerError::Pidfd { pid, source }),
        };
        if pid_of_pidfd(&pidfd).map_err(|source| PeerError::Pidfd { pid, source })? != pid {
            return Err(PeerError::Exited(pid));
        }
        // /proc/PID is this process as long as the pidfd says it has not exited afterwards.
        let start_time = start_time(pid).map_err(gone)?;
        let peer = Peer {
            pid,
            uid,
            gid,
            groups,
            start_time,
            pidfd,
        };
        if peer.exited() {
            return Err(PeerError::Exited(pid));
        }
        Ok(peer)
    }

    /// Whether the process has exited.
    pub fn exited(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one valid pollfd without blocking.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        ready != 0
    }
}

fn peer_pidfd(stream: &UnixStream) -> io::Result<OwnedFd> {
    if WITHOUT_PEER_PIDFD.load(Ordering::Relaxed) {
        return Err(io::Error::from_raw_os_error(libc::ENOPROTOOPT));
    }
    let mut fd: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes one int into `fd` and its size into `len`.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if ret != 0 || fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new pidfd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The fallback: a pidfd for whatever process has `pid` now, refused if the pid was recycled
/// while the pidfd was being opened (its start time changed).
fn open_checked(pid: i32) -> Result<OwnedFd, PeerError> {
    let before = start_time(pid).map_err(|_| PeerError::Exited(pid))?;
    let pidfd = pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => PeerError::Exited(pid),
        _ => PeerError::Pidfd { pid, source: e },
    })?;
    match start_time(pid) {
        Ok(after) if after == before => Ok(pidfd),
        _ => Err(PeerError::Exited(pid)),
    }
}

/// SO_PEERGROUPS: the supplementary groups of the process that connected, at connect.
fn peer_groups(stream: &UnixStream) -> io::Result<Vec<u32>> {
    let mut groups: Vec<libc::gid_t> = vec![0; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into the vector's buffer.
        let ret = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(needed);
            return Ok(groups);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(e);
        }
        groups.resize(needed, 0);
    }
}

/// SO_PEERCRED: pid, uid and gid of the process that connected. The pid is 0 when that process
/// is in a pid namespace ours cannot see (a VMM on the host of a containerised vublk).
fn peer_credentials(stream: &UnixStream) -> io::Result<(i32, u32, u32)> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills at most `len` bytes of `cred`, a plain C struct.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((cred.pid, cred.uid, cred.gid))
}

fn start_time(pid: i32) -> io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    proc::parse_stat_start_time(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad /proc/PID/stat"))
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
