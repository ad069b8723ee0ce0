//! Where frontends come from: a socket path we create, or an inherited fd (QEMU's "backend
//! program conventions", systemd socket activation, a launcher's socketpair).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use rustix::net::sockopt;

use super::DaemonError;

/// What the command line names.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Path(PathBuf),
    Fd(RawFd),
}

/// Who may connect to a socket we create: its mode and group (default: the umask's mode, our
/// group). A VMM running as another user needs write permission on the socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketAccess {
    pub mode: Option<u32>,
    pub group: Option<u32>,
}

/// An open endpoint.
pub enum Listener {
    /// Accept frontends one after another. `created` is the path to remove on exit (only a
    /// socket we created ourselves).
    Listening { listener: UnixListener, created: Option<PathBuf> },
    /// Serve this one connection, then exit.
    Connected(UnixStream),
}

impl Endpoint {
    pub fn open(&self, access: SocketAccess) -> Result<Listener, DaemonError> {
        match self {
            Endpoint::Path(path) => bind(path, access),
            Endpoint::Fd(fd) => adopt(*fd),
        }
    }
}

fn bind(path: &PathBuf, access: SocketAccess) -> Result<Listener, DaemonError> {
    let bind_err = |source| DaemonError::Bind { path: path.clone(), source };
    // A socket left behind by a daemon that died is replaced; a live one is not stolen.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(io::Error::new(io::ErrorKind::AlreadyExists, "a file that is not a socket is in the way")));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(DaemonError::SocketInUse { path: path.clone() }),
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(bind_err)?;
            }
            Err(e) => return Err(bind_err(e)),
        }
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    if let Some(group) = access.group {
        std::os::unix::fs::chown(path, None, Some(group)).map_err(bind_err)?;
    }
    if let Some(mode) = access.mode {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).map_err(bind_err)?;
    }
    tracing::info!("listening on {}", path.display());
    Ok(Listener::Listening { listener, created: Some(path.clone()) })
}

fn adopt(fd: RawFd) -> Result<Listener, DaemonError> {
    let bad = |source| DaemonError::BadFd { fd, source };
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: the fd is open (checked above) and --fd hands it to us: nothing else in this
    // process uses it, so the OwnedFd may own it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_unix_stream = sockopt::socket_domain(&owned).is_ok_and(|d| d == rustix::net::AddressFamily::UNIX)
        && sockopt::socket_type(&owned).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
    if !is_unix_stream {
        return Err(DaemonError::NotUnixStream { fd });
    }
    // Inherited without O_CLOEXEC perhaps; it must not leak into anything we might exec.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| bad(e.into()))?;
    if sockopt::socket_acceptconn(&owned).map_err(|e| bad(e.into()))? {
        tracing::info!("listening on inherited fd {}", owned.as_raw_fd());
        Ok(Listener::Listening { listener: UnixListener::from(owned), created: None })
    } else {
        tracing::info!("serving the connection on inherited fd {}", owned.as_raw_fd());
        Ok(Listener::Connected(UnixStream::from(owned)))
    }
}

impl Listener {
    /// Removes the socket we created, if any.
    pub fn cleanup(&self) {
        if let Listener::Listening { created: Some(path), .. } = self {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}
