//! Giving a child process a descriptor at a fixed number, between fork and exec.

use std::io;
use std::os::fd::RawFd;

/// Makes the open descriptor `from` available as `to` across exec.
///
/// # Safety
/// Only for a `pre_exec` closure: it calls only async-signal-safe functions (`dup2`, `fcntl`),
/// and `from` must stay open in the parent until `spawn` returns.
pub unsafe fn place(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: plain descriptor calls; the caller keeps `from` open.
    let failed = unsafe {
        if from == to {
            // dup2 onto itself keeps FD_CLOEXEC; clear it by hand.
            libc::fcntl(from, libc::F_SETFD, 0) < 0
        } else {
            libc::dup2(from, to) < 0
        }
    };
    if failed {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
