//! The export's unix socket, bound and listening before either process starts.
//!
//! vmm-glue owns the socket: it is bound here, handed to vublk as its listening `--fd`, and
//! removed when the launch ends — but only if the path still names the socket bound here, so a
//! socket someone created in its place afterwards is left alone. A socket file nobody listens
//! on (left by a launcher or daemon that was killed) is replaced; a live one is not taken over.

use std::io::{self, ErrorKind};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::LaunchError;

/// A listening unix socket at a path, removed on drop.
pub struct BoundSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file bound here.
    id: (u64, u64),
}

impl BoundSocket {
    /// Binds and listens on `path`, replacing a stale socket file.
    pub fn bind(path: &Path) -> Result<Self, LaunchError> {
        let fail = |source| LaunchError::Socket {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(LaunchError::NotASocket(path.to_path_buf()))
            }
            Ok(_) => match UnixStream::connect(path) {
                Ok(_) => return Err(LaunchError::SocketInUse(path.to_path_buf())),
                // Nobody listens: a leftover. Anything else (no permission) is reported.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path).map_err(fail)?;
                }
                Err(e) => return Err(fail(e)),
            },
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let listener = UnixListener::bind(path).map_err(fail)?;
        let m = std::fs::symlink_metadata(path).map_err(fail)?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
        })
    }

    /// The listening socket (close-on-exec; the vublk spawner makes its copy inheritable).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one bound here.
    fn remove(&self) -> io::Result<()> {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => std::fs::remove_file(&self.path),
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for BoundSocket {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_replaces_stale_sockets_and_removes_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        // A stale socket: bound, then its listener closed.
        drop(UnixListener::bind(&path).unwrap());
        let s = BoundSocket::bind(&path).unwrap();
        UnixStream::connect(&path).unwrap();
        // A live one is not taken over.
        assert!(matches!(
            BoundSocket::bind(&path),
            Err(LaunchError::SocketInUse(_))
        ));
        drop(s);
        assert!(!path.exists());
    }

    #[test]
    fn leaves_a_replacement_and_other_files_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let s = BoundSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = UnixListener::bind(&path).unwrap();
        drop(s);
        assert!(path.exists(), "removed a socket it did not create");
        drop(other);

        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            BoundSocket::bind(&file),
            Err(LaunchError::NotASocket(_))
        ));
        assert!(file.exists());
    }
}
