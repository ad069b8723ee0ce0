//! `--fd N`: a socket inherited from whoever started vublk (QEMU's "backend program
//! conventions", systemd socket activation, a launcher's socketpair), listening or already
//! connected.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};

use rustix::net::sockopt;

use super::{EndpointError, Listener};

pub(super) fn adopt(fd: RawFd) -> Result<Listener, EndpointError> {
    let bad = |source| EndpointError::BadFd { fd, source };
    // SAFETY: F_GETFD only inspects the descriptor table.
    if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(bad(io::Error::from_raw_os_error(libc::EBADF)));
    }
    // SAFETY: the fd is open (checked above) and --fd hands it to us: nothing else in this
    // process uses it, so the OwnedFd may own it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let is_unix_stream = sockopt::socket_domain(&owned)
        .is_ok_and(|d| d == rustix::net::AddressFamily::UNIX)
        && sockopt::socket_type(&owned).is_ok_and(|t| t == rustix::net::SocketType::STREAM);
    if !is_unix_stream {
        return Err(EndpointError::NotUnixStream { fd });
    }
    // Inherited without O_CLOEXEC perhaps; it must not leak into anything we might exec.
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC).map_err(|e| bad(e.into()))?;
    if sockopt::socket_acceptconn(&owned).map_err(|e| bad(e.into()))? {
        tracing::info!("listening on inherited fd {}", owned.as_raw_fd());
        Ok(Listener::Listening {
            listener: UnixListener::from(owned),
            created: None,
        })
    } else {
        tracing::info!(
            "serving the connection on inherited fd {}",
            owned.as_raw_fd()
        );
        Ok(Listener::Connected(UnixStream::from(owned)))
    }
}
