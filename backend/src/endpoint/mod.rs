//! Where frontends come from: a socket path vublk creates (`bind.rs`) or an inherited fd
//! (`adopt.rs`), listening or already connected; and what a failed accept means for the loop
//! that tried it. The supervisor and the `--single-process` daemon both serve endpoints.

mod adopt;
mod bind;
pub mod inherited;

use std::io;
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use thiserror::Error;

pub use bind::BindError;

#[derive(Debug, Error)]
pub enum EndpointError {
    #[error("{path} is in use by another process")]
    SocketInUse { path: PathBuf },
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: BindError,
    },
    #[error("--fd {fd} is not usable")]
    BadFd {
        fd: i32,
        #[source]
        source: io::Error,
    },
    #[error("--fd {fd} is not a unix stream socket")]
    NotUnixStream { fd: i32 },
}

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
    Listening {
        listener: UnixListener,
        created: Option<PathBuf>,
    },
    /// Serve this one connection, then exit.
    Connected(UnixStream),
}

impl Endpoint {
    pub fn open(&self, access: SocketAccess) -> Result<Listener, EndpointError> {
        match self {
            Endpoint::Path(path) => bind::bind(path, access),
            Endpoint::Fd(fd) => adopt::adopt(*fd),
        }
    }

    /// How logs and `vublk status` name it: the socket path, or `fd:N`.
    pub fn name(&self) -> String {
        match self {
            Endpoint::Path(path) => path.display().to_string(),
            Endpoint::Fd(fd) => format!("fd:{fd}"),
        }
    }
}

impl Listener {
    /// The path a listening socket is bound to (whoever bound it), if it has one.
    pub fn bound_path(&self) -> Option<PathBuf> {
        match self {
            Listener::Listening { listener, .. } => listener
                .local_addr()
                .ok()?
                .as_pathname()
                .filter(|p| !p.as_os_str().is_empty())
                .map(PathBuf::from),
            Listener::Connected(_) => None,
        }
    }

    /// Removes the socket we created, if any.
    pub fn cleanup(&self) {
        if let Listener::Listening {
            created: Some(path),
            ..
        } = self
        {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

/// What a failed `accept` on a listening socket means for the loop that called it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// Nothing to take after all (a peer that gave up, a signal, a wake-up another accept
    /// answered): carry on.
    Nothing,
    /// The process or the system has no descriptor left for the connection, which stays
    /// queued: the listener stays readable and would wake the loop again at once.
    NoDescriptors,
    /// The kernel is short of memory; the same holds.
    NoMemory,
    /// Anything else.
    Other,
}

impl AcceptFailure {
    pub fn of(e: &io::Error) -> AcceptFailure {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => AcceptFailure::NoDescriptors,
            Some(libc::ENOMEM | libc::ENOBUFS) => AcceptFailure::NoMemory,
            _ if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock
                    | io::ErrorKind::Interrupted
                    | io::ErrorKind::ConnectionAborted
            ) =>
            {
                AcceptFailure::Nothing
            }
            _ => AcceptFailure::Other,
        }
    }

    /// Whether the loop would wake again at once for the same connection.
    pub fn is_shortage(self) -> bool {
        matches!(self, AcceptFailure::NoDescriptors | AcceptFailure::NoMemory)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_by_errno() {
        let of = |errno| AcceptFailure::of(&io::Error::from_raw_os_error(errno));
        for (errno, class) in [
            (libc::EMFILE, AcceptFailure::NoDescriptors),
            (libc::ENFILE, AcceptFailure::NoDescriptors),
            (libc::ENOMEM, AcceptFailure::NoMemory),
            (libc::ENOBUFS, AcceptFailure::NoMemory),
            (libc::EAGAIN, AcceptFailure::Nothing),
            (libc::EINTR, AcceptFailure::Nothing),
            (libc::ECONNABORTED, AcceptFailure::Nothing),
            (libc::EPROTO, AcceptFailure::Other),
        ] {
            assert_eq!(of(errno), class, "errno {errno}");
        }
        assert!(of(libc::EMFILE).is_shortage() && of(libc::ENOBUFS).is_shortage());
        assert!(!of(libc::EAGAIN).is_shortage() && !of(libc::EPROTO).is_shortage());
    }
}
