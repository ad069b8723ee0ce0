//! `--socket-path`: the socket vublk creates, with the mode and group the export asks for, set
//! so that nobody else can connect before they are and no other file gets them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use rustix::fs::{FileType, Mode, OFlags};
use thiserror::Error;

use super::{EndpointError, Listener, SocketAccess};

/// Why the socket could not be created as asked (the cause of [`EndpointError::Bind`]).
#[derive(Debug, Error)]
pub enum BindError {
    #[error("a file that is not a socket is in the way")]
    NotASocket,
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("cannot open the new socket to set its mode and group")]
    OpenBound(#[source] io::Error),
    #[error("the new socket was replaced by {0} before its mode and group were set")]
    Replaced(&'static str),
    #[error("cannot set its group to {gid}")]
    Group {
        gid: u32,
        #[source]
        source: io::Error,
    },
    #[error("cannot set its mode to {mode:04o}")]
    Mode {
        mode: u32,
        #[source]
        source: io::Error,
    },
}

pub(super) fn bind(path: &Path, access: SocketAccess) -> Result<Listener, EndpointError> {
    let bind_err = |source: BindError| EndpointError::Bind {
        path: path.to_owned(),
        source,
    };
    let io_err = |e: io::Error| bind_err(e.into());
    // Passed by whoever started us (systemd, the vublk we replace): served as it is, never
    // bound again (inherited.rs).
    if let Some((listener, created)) = super::inherited::take_unix_listener(path) {
        return Ok(Listener::Listening {
            listener,
            created: created.then(|| path.to_owned()),
        });
    }
    // A socket left behind by a daemon that died is replaced; a live one is not stolen.
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(bind_err(BindError::NotASocket));
        }
        match UnixStream::connect(path) {
            Ok(_) => {
                return Err(EndpointError::SocketInUse {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => {
                tracing::info!("removing stale socket {}", path.display());
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        }
    }
    // Created owner-only, so that nobody else can connect before the mode and group below are
    // set. The umask is the process's: this is safe because no other thread creates files
    // meanwhile (the supervisor has none, also when it binds an export added at run time; the
    // single-process daemon binds before starting any).
    let umask = rustix::process::umask(Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(umask);
    let listener = bound.map_err(io_err)?;
    // Without --socket-mode, what the umask would have given: the default is unchanged.
    let mode = access.mode.unwrap_or(0o777 & !umask.bits());
    let socket = open_bound(path).map_err(bind_err)?;
    if let Err(e) = set_access(&socket, mode, access.group) {
        // Ours (open_bound checked it): no socket is left behind with the wrong permissions.
        let _ = std::fs::remove_file(path);
        return Err(bind_err(e));
    }
    tracing::info!("listening on {}", path.display());
    Ok(Listener::Listening {
        listener,
        created: Some(path.to_owned()),
    })
}

/// An `O_PATH` descriptor of the socket file just bound at `path`, checked to be a socket of
/// ours: whoever may write the socket's directory could otherwise put a symbolic link (to
/// /etc/shadow, say) or a file in its place before we set its mode and group, and have us
/// change those of the wrong file. A user other than ours cannot make a socket we own, so
/// only another process of our own user could swap in another socket. The descriptor pins the
/// inode: what is done through it cannot reach another file.
///
/// No connection is made to check it further: the socket exists, and a frontend may already
/// be connecting to it.
fn open_bound(path: &Path) -> Result<OwnedFd, BindError> {
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| BindError::OpenBound(e.into()))?;
    let stat = rustix::fs::fstat(&fd).map_err(io::Error::from)?;
    if FileType::from_raw_mode(stat.st_mode) != FileType::Socket {
        return Err(BindError::Replaced("something that is not a socket"));
    }
    if stat.st_uid != rustix::process::geteuid().as_raw() {
        return Err(BindError::Replaced("another user's socket"));
    }
    Ok(fd)
}

/// Sets the group (if any), then the mode of the socket `socket` holds: in this order because a
/// change of group may clear the set-group-ID bit.
fn set_access(socket: &OwnedFd, mode: u32, group: Option<u32>) -> Result<(), BindError> {
    if let Some(gid) = group {
        rustix::fs::chownat(
            socket,
            "",
            None,
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::EMPTY_PATH,
        )
        .map_err(|e| BindError::Group {
            gid,
            source: e.into(),
        })?;
    }
    // fchmod does not take an O_PATH descriptor; its /proc link leads to the same inode.
    rustix::fs::chmodat(
        rustix::fs::CWD,
        format!("/proc/self/fd/{}", socket.as_raw_fd()),
        Mode::from_raw_mode(mode),
        rustix::fs::AtFlags::empty(),
    )
    .map_err(|e| BindError::Mode {
        mode,
        source: e.into(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::sync::Mutex;

    use super::*;

    /// `bind` changes the process's umask for a moment: tests that bind take turns.
    static UMASK: Mutex<()> = Mutex::new(());

    fn bound(path: &Path, access: SocketAccess) -> Result<UnixListener, EndpointError> {
        match bind(path, access)? {
            Listener::Listening { listener, .. } => Ok(listener),
            Listener::Connected(_) => unreachable!(),
        }
    }

    #[test]
    fn mode_and_group_are_set_and_the_default_mode_is_the_umasks() {
        let _turn = UMASK.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sock");
        let _listener = bound(
            &path,
            SocketAccess {
                mode: Some(0o660),
                group: Some(100),
            },
        )
        .unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            (meta.permissions().mode() & 0o7777, meta.gid()),
            (0o660, 100)
        );

        let umask = rustix::process::umask(Mode::from_raw_mode(0o027));
        let plain = dir.path().join("b.sock");
        let listener = bound(&plain, SocketAccess::default());
        rustix::process::umask(umask);
        let _listener = listener.unwrap();
        let meta = std::fs::symlink_metadata(&plain).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750);
        assert_eq!(meta.gid(), rustix::process::getegid().as_raw());
        assert_eq!(
            rustix::process::umask(umask),
            umask,
            "the umask was not restored"
        );
    }

    /// What is at the path when the permissions are set must be the socket just bound: not a
    /// link (its target's permissions would change), not another socket, not a file.
    #[test]
    fn only_the_socket_just_bound_gets_the_permissions() {
        let _turn = UMASK.lock().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.sock");
        let _listener = UnixListener::bind(&ours).unwrap();
        assert!(open_bound(&ours).is_ok());

        let target = dir.path().join("target");
        std::fs::write(&target, b"").unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.path().join("link.sock");
        std::os::unix::fs::symlink(&ours, &link).unwrap();
        let file_link = dir.path().join("file-link.sock");
        std::os::unix::fs::symlink(&target, &file_link).unwrap();
        for (path, expected) in [
            (&link, "the new socket was replaced by something that is not a socket before its mode and group were set"),
            (&file_link, "the new socket was replaced by something that is not a socket before its mode and group were set"),
            (&target, "the new socket was replaced by something that is not a socket before its mode and group were set"),
        ] {
            let err = open_bound(path).unwrap_err();
            assert_eq!(err.to_string(), expected, "{}", path.display());
        }
        assert_eq!(
            std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}
