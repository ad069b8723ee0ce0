//! Listening sockets handed over the way systemd passes them (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`; sd_listen_fds(3)): by systemd's socket units, `systemd-socket-activate`,
//! and a vublk daemon upgrading itself (`vublk upgrade`, supervisor/upgrade.rs).
//!
//! A `--socket-path` (or `--control-socket`) whose socket was passed so is not bound again: the
//! inherited socket, bound to that path, is served as it is, so the path never stops
//! accepting. Matching is by the path the socket is bound to (getsockname). A socket passed
//! with the name [`CREATED_BY_VUBLK`] was created by the vublk before, which would have
//! removed it on exit: this one does instead. Any other (systemd's) is left alone on exit.
//!
//! The fd named [`READY_NAME`] is a pipe to the daemon that started this one: "READY=1" is
//! written to it once every socket is served ([`notify_ready`]).
//!
//! The supervisor is single-threaded and reads the variables once, before anything else runs
//! ([`take_from_environment`]); they are removed so that workers do not see them.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rustix::net::sockopt;

/// The name of a passed socket its vublk created (and removes on exit).
pub const CREATED_BY_VUBLK: &str = "vublk-created";
/// The name of the readiness pipe.
pub const READY_NAME: &str = "vublk-ready";
/// The name of the metrics listener (`--metrics-addr`).
pub const METRICS_NAME: &str = "vublk-metrics";
/// The first passed fd.
const FIRST: i32 = 3;
/// Most fds taken from LISTEN_FDS.
const MAX_FDS: usize = 1024;

static INHERITED: Mutex<Vec<(OwnedFd, String)>> = Mutex::new(Vec::new());

/// Takes the fds passed with LISTEN_FDS (if LISTEN_PID is ours), close-on-exec from now on,
/// and removes the variables; except those in `named` (`--fd N`: served as that option says).
/// Returns how many.
pub fn take_from_environment(named: &[i32]) -> usize {
    let ours = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|pid| pid.parse::<u32>().ok())
        == Some(std::process::id());
    let count = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0)
        .min(MAX_FDS);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    for name in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(name);
    }
    if !ours {
        return 0;
    }
    let mut names = names.split(':');
    let mut taken = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    for fd in FIRST..FIRST + count as i32 {
        let name = names.next().unwrap_or("").to_owned();
        if named.contains(&fd) {
            continue;
        }
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            tracing::warn!("LISTEN_FDS names fd {fd}, which is not open");
            continue;
        }
        // SAFETY: the fd is open (checked above) and LISTEN_FDS hands it to this process, which
        // has not used it: the OwnedFd may own it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Err(e) = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC) {
            tracing::warn!("inherited fd {fd}: {e}");
        }
        taken.push((owned, name));
    }
    taken.len()
}

/// The inherited listening unix socket bound to `path`, if any, and whether the daemon that
/// passed it had created it (so that this one removes it on exit).
pub fn take_unix_listener(path: &Path) -> Option<(UnixListener, bool)> {
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    let index = inherited.iter().position(|(fd, _)| {
        is_listening(fd)
            && sockopt::socket_domain(fd).is_ok_and(|d| d == rustix::net::AddressFamily::UNIX)
            && bound_path(fd).is_some_and(|bound| bound == path)
    })?;
    let (fd, name) = inherited.swap_remove(index);
    tracing::info!(
        "listening on {} (inherited fd {})",
        path.display(),
        fd.as_raw_fd()
    );
    Some((UnixListener::from(fd), name == CREATED_BY_VUBLK))
}

/// The inherited TCP listener bound to `addr`, if any.
pub fn take_tcp_listener(addr: SocketAddr) -> Option<TcpListener> {
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    let index = inherited.iter().position(|(fd, _)| {
        is_listening(fd)
            && fd
                .try_clone()
                .is_ok_and(|dup| TcpListener::from(dup).local_addr().is_ok_and(|a| a == addr))
    })?;
    Some(TcpListener::from(inherited.swap_remove(index).0))
}

/// Tells the daemon that started this one (if one did) that every socket is served, and
/// closes the inherited fds no one took.
pub fn notify_ready() {
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    for (fd, name) in inherited.drain(..) {
        if name == READY_NAME {
            if let Err(e) = rustix::io::write(&fd, b"READY=1\n") {
                tracing::warn!("cannot tell the daemon that started this one it is ready: {e}");
            }
        } else {
            tracing::warn!(
                "inherited fd {} ({}) matches no socket this daemon serves; closed",
                fd.as_raw_fd(),
                if name.is_empty() { "no name" } else { &name }
            );
        }
    }
}

fn is_listening(fd: &OwnedFd) -> bool {
    sockopt::socket_acceptconn(fd).unwrap_or(false)
}

fn bound_path(fd: &OwnedFd) -> Option<PathBuf> {
    let dup = UnixListener::from(fd.try_clone().ok()?);
    dup.local_addr().ok()?.as_pathname().map(Path::to_path_buf)
}
