//! Layer 3: clean descriptors. The supervisor put /dev/null at fds 0 and 1 and the write end of
//! the worker's log pipe at fd 2 (supervisor/spawn.rs), so nothing a worker writes reaches the
//! daemon's own log stream except through the supervisor, which prefixes, escapes and
//! rate-limits each line (supervisor/worker_log.rs). Here every descriptor the worker inherited
//! and does not need is closed, whatever opened it.

use std::io;
use std::os::fd::RawFd;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum FdsError {
    #[error("fd {0} (stdin, stdout or stderr) is not open")]
    MissingStdio(RawFd),
    #[error("cannot close the inherited descriptors")]
    Close(#[source] io::Error),
}

/// Checks that 0, 1 and 2 are open and closes every descriptor above 2 except `keep`.
pub fn clean(keep: &[RawFd]) -> Result<(), FdsError> {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on a descriptor number only reads its flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(FdsError::MissingStdio(fd));
        }
    }
    let mut keep: Vec<u32> = keep
        .iter()
        .filter(|&&fd| fd > 2)
        .map(|&fd| fd as u32)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep.into_iter().chain([u32::MAX]) {
        if fd > first {
            // SAFETY: closes descriptors nothing in this process owns: the worker has adopted
            // only the ones in `keep`, and no thread runs yet.
            let ret = unsafe { libc::close_range(first, fd - 1, 0) };
            if ret != 0 {
                return Err(FdsError::Close(io::Error::last_os_error()));
            }
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}
