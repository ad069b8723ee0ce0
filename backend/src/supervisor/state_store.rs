//! The guest's write-cache choice on disk, so that a new daemon (a fresh start after a crash,
//! an upgrade) restores it for the same VM: one small file per VMM and export in the state
//! directory (`--state-dir`, default `vublk-state` beside the first export's socket).
//!
//! A file is named `<pid>-<start time>-<export>`: the VMM's pid and its start time (field 22
//! of /proc/PID/stat), which together name one process for as long as the host runs and are
//! never reused by another VM, and a hash of the export's socket path. It holds one JSON
//! object, `{"export": PATH, "write_cache": BOOL}`. Files are written whole (a temporary file
//! renamed over the old one; no fsync: the directory is meant for /run, which a reboot
//! empties along with every VMM the state was about).
//!
//! What is read is untrusted: the directory must be ours (a directory owned by our user, not
//! writable by anyone else), files are opened without following links, must be regular files
//! of at most [`MAX_FILE`] bytes and name the export asked for; anything else is one log line
//! and ignored (the daemon's `--write-cache` applies). A file of a VMM that is gone is removed
//! when its VMM's worker exits and, for those a killed daemon left behind, at start.

use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A VMM: its pid and start time, as the VM table keys it.
type VmmKey = (i32, u64);

/// The largest state file read; one is under a hundred bytes plus its export's path.
pub(super) const MAX_FILE: u64 = 8192;

#[derive(Debug, Error)]
pub(super) enum StateDirError {
    #[error("cannot create or open it")]
    Open(#[source] io::Error),
    #[error("it is not a directory owned by us (uid {uid}) that only we may write")]
    NotOurs { uid: u32 },
}

#[derive(Debug, Error)]
enum ReadError {
    #[error("cannot open it")]
    Open(#[source] io::Error),
    #[error("it is not a regular file")]
    NotAFile,
    #[error("it is larger than {MAX_FILE} bytes")]
    TooLarge,
    #[error("cannot read it")]
    Read(#[source] io::Error),
    #[error("it is not a state file")]
    Parse(#[source] serde_json::Error),
    #[error("it names another export ({0})")]
    OtherExport(String),
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    export: String,
    write_cache: bool,
}

/// The state directory, held open.
pub(super) struct StateStore {
    dir: OwnedFd,
    path: PathBuf,
}

impl StateStore {
    /// Opens `path`, creating it (mode 0700) if it does not exist.
    pub fn open(path: &Path) -> Result<StateStore, StateDirError> {
        match rustix::fs::mkdir(path, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(StateDirError::Open(e.into())),
        }
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| StateDirError::Open(e.into()))?;
        let stat = rustix::fs::fstat(&dir).map_err(|e| StateDirError::Open(e.into()))?;
        let uid = rustix::process::geteuid().as_raw();
        if stat.st_uid != uid || stat.st_mode & 0o022 != 0 {
            return Err(StateDirError::NotOurs { uid });
        }
        Ok(StateStore {
            dir,
            path: path.to_owned(),
        })
    }

    #[cfg(test)]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The write cache the guest of `vmm` chose for `export` (its socket path), as a daemon
    /// before this one wrote it.
    pub fn write_cache(&self, vmm: VmmKey, export: &str) -> Option<bool> {
        let name = file_name(vmm, export);
        match self.read(&name, export) {
            Ok(state) => state.map(|s| s.write_cache),
            Err(e) => {
                tracing::warn!(
                    "ignoring state file {}: {}",
                    self.path.join(&name).display(),
                    crate::error_line(&e)
                );
                None
            }
        }
    }

    fn read(&self, name: &str, export: &str) -> Result<Option<StateFile>, ReadError> {
        let file = match rustix::fs::openat(
            &self.dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(file) => file,
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(ReadError::Open(e.into())),
        };
        let stat = rustix::fs::fstat(&file).map_err(|e| ReadError::Open(e.into()))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err(ReadError::NotAFile);
        }
        if stat.st_size as u64 > MAX_FILE {
            return Err(ReadError::TooLarge);
        }
        let mut body = Vec::new();
        std::fs::File::from(file)
            .take(MAX_FILE + 1)
            .read_to_end(&mut body)
            .map_err(ReadError::Read)?;
        if body.len() as u64 > MAX_FILE {
            return Err(ReadError::TooLarge);
        }
        let state: StateFile = serde_json::from_slice(&body).map_err(ReadError::Parse)?;
        if state.export != export {
            return Err(ReadError::OtherExport(state.export));
        }
        Ok(Some(state))
    }

    /// Writes the guest's choice; a failure is one warning (the choice still holds for this
    /// daemon's next workers).
    pub fn set_write_cache(&self, vmm: VmmKey, export: &str, on: bool) {
        let name = file_name(vmm, export);
        if let Err(e) = self.write(&name, export, on) {
            tracing::warn!(
                "cannot write state file {}: {e}; a new daemon will not know the write cache \
                 this VM's guest chose",
                self.path.join(&name).display()
            );
        }
    }

    fn write(&self, name: &str, export: &str, on: bool) -> io::Result<()> {
        let body = serde_json::to_vec(&StateFile {
            export: export.to_owned(),
            write_cache: on,
        })
        .map_err(io::Error::other)?;
        let temporary = format!(".{name}.tmp");
        let file = rustix::fs::openat(
            &self.dir,
            &temporary,
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        std::fs::File::from(file).write_all(&body)?;
        rustix::fs::renameat(&self.dir, &temporary, &self.dir, name)?;
        Ok(())
    }

    /// Removes every file of `vmm` (it exited).
    pub fn forget(&self, vmm: VmmKey) {
        let prefix = format!("{}-{}-", vmm.0, vmm.1);
        self.remove_where(|name| name.starts_with(&prefix));
    }

    /// Removes the files of VMMs that are gone (a daemon killed before it could), and
    /// temporary files a killed daemon left.
    pub fn sweep(&self) {
        self.remove_where(|name| match parse_name(name) {
            Some((pid, start_time)) => !alive(pid, start_time),
            None => name.starts_with('.') && name.ends_with(".tmp"),
        });
    }

    fn remove_where(&self, doomed: impl Fn(&str) -> bool) {
        let names: Vec<String> = match std::fs::read_dir(&self.path) {
            Ok(entries) => entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect(),
            Err(e) => {
                tracing::warn!("cannot list {}: {e}", self.path.display());
                return;
            }
        };
        for name in names.iter().filter(|n| doomed(n)) {
            if let Err(e) = rustix::fs::unlinkat(&self.dir, name.as_str(), AtFlags::empty()) {
                tracing::warn!(
                    "cannot remove state file {}: {e}",
                    self.path.join(name).display()
                );
            }
        }
    }
}

/// `<pid>-<start time>-<FNV-1a 64 of the export's path, hex>`.
fn file_name(vmm: VmmKey, export: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in export.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}-{}-{hash:016x}", vmm.0, vmm.1)
}

/// The VMM a state file's name names.
fn parse_name(name: &str) -> Option<VmmKey> {
    let mut parts = name.splitn(3, '-');
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    let hash = parts.next()?;
    (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some((pid, start_time))
}

/// Whether process `pid` runs and started at `start_time`.
fn alive(pid: i32, start_time: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| crate::identity::proc::parse_stat_start_time(&stat))
        == Some(start_time)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: VmmKey = (100, 1);

    #[test]
    fn a_choice_written_is_read_back_per_vmm_and_export() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("state")).unwrap();
        assert_eq!(store.write_cache(A, "/run/a.sock"), None);
        store.set_write_cache(A, "/run/a.sock", false);
        store.set_write_cache(A, "/run/b.sock", true);
        // Another store on the same directory (a new daemon) reads them.
        let again = StateStore::open(&dir.path().join("state")).unwrap();
        assert_eq!(again.write_cache(A, "/run/a.sock"), Some(false));
        assert_eq!(again.write_cache(A, "/run/b.sock"), Some(true));
        assert_eq!(again.write_cache((100, 2), "/run/a.sock"), None);
        again.set_write_cache(A, "/run/a.sock", true);
        assert_eq!(store.write_cache(A, "/run/a.sock"), Some(true));
        store.forget(A);
        assert_eq!(store.write_cache(A, "/run/b.sock"), None);
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
    }

    #[test]
    fn bad_files_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let at = |export| dir.path().join(file_name(A, export));
        std::fs::write(at("/garbage"), b"{not json").unwrap();
        std::fs::write(at("/big"), vec![b' '; MAX_FILE as usize + 1]).unwrap();
        std::fs::write(at("/other"), br#"{"export":"/else","write_cache":false}"#).unwrap();
        std::fs::create_dir(at("/dir")).unwrap();
        std::os::unix::fs::symlink(at("/other"), at("/link")).unwrap();
        for export in ["/garbage", "/big", "/other", "/dir", "/link"] {
            assert_eq!(store.write_cache(A, export), None, "{export}");
        }
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(
            StateStore::open(dir.path()),
            Err(StateDirError::NotOurs { .. })
        ));
    }

    #[test]
    fn the_sweep_removes_only_files_of_vmms_that_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(dir.path()).unwrap();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
        let me = (
            std::process::id() as i32,
            crate::identity::proc::parse_stat_start_time(&stat).unwrap(),
        );
        store.set_write_cache(me, "/x", false);
        store.set_write_cache((me.0, me.1 + 1), "/x", false);
        std::fs::write(dir.path().join("unrelated"), b"").unwrap();
        store.sweep();
        assert_eq!(store.write_cache(me, "/x"), Some(false));
        assert_eq!(store.write_cache((me.0, me.1 + 1), "/x"), None);
        assert!(dir.path().join("unrelated").exists());
    }
}
