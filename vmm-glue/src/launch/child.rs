//! One child process (vublk or the VMM): started so it cannot outlive vmm-glue, watched through a
//! pidfd, stopped with SIGTERM and, after a bounded wait, SIGKILL.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};

use super::signals::{self, StopSignals};

/// A running (or exited, not yet dropped) child.
pub struct Child {
    name: String,
    child: std::process::Child,
    pidfd: OwnedFd,
    status: Option<ExitStatus>,
}

/// How a [`Child::stop`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped {
    pub status: ExitStatus,
    /// SIGTERM was not enough: the child was killed.
    pub killed: bool,
}

impl Child {
    /// Starts `cmd` as `name`. The child gets SIGTERM if vmm-glue dies first (parent-death
    /// signal), starts with no signal blocked (vmm-glue blocks the stop signals, and a blocked
    /// mask survives exec), and, with `inherit`, gets the descriptor `inherit.0` as `inherit.1`.
    pub fn spawn(
        name: &str,
        mut cmd: Command,
        inherit: Option<(RawFd, RawFd)>,
    ) -> io::Result<Self> {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set we own.
        let empty = unsafe {
            libc::sigemptyset(empty.as_mut_ptr());
            empty.assume_init()
        };
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe calls (sigprocmask, prctl, getppid, raise, dup2, fcntl) on a signal
        // set it owns and on descriptors the parent keeps open until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) < 0 {
                    return Err(io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died before the prctl: then nobody would send the signal.
                if libc::getppid() != parent {
                    libc::raise(libc::SIGTERM);
                }
                if let Some((from, to)) = inherit {
                    crate::inherit::place(from, to)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        Ok(Self {
            name: name.to_string(),
            child,
            pidfd,
            status: None,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the child has exited (reaps it).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Sends `signal` unless the child has already been reaped.
    pub fn signal(&mut self, signal: i32) -> io::Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: pidfd_send_signal on our own pidfd with no siginfo; the pidfd names exactly
        // this child even if its pid were reused.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // ESRCH: it exited between try_wait and the signal.
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Waits up to `timeout` for the child to exit; `None` if it is still running.
    #[cfg(test)]
    pub fn wait_timeout(&mut self, timeout: Duration) -> io::Result<Option<ExitStatus>> {
        let start = Instant::now();
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Ok(None);
            }
            poll_readable(&[self.pidfd.as_fd()], Some(left))?;
        }
    }

    /// Stops the child: SIGTERM, then SIGKILL if it has not exited after `grace` (or at once
    /// if one of `signals` arrives meanwhile: a second Ctrl-C means "now").
    pub fn stop(&mut self, grace: Duration, signals: Option<&StopSignals>) -> io::Result<Stopped> {
        if let Some(status) = self.try_wait()? {
            return Ok(Stopped {
                status,
                killed: false,
            });
        }
        self.signal(libc::SIGTERM)?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Stopped {
                    status,
                    killed: false,
                });
            }
            let left = grace.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            let mut fds = vec![self.pidfd.as_fd()];
            if let Some(s) = signals {
                fds.push(s.as_fd());
            }
            poll_readable(&fds, Some(left))?;
            if let Some(s) = signals {
                if s.take()?.is_some() {
                    break;
                }
            }
        }
        self.signal(libc::SIGKILL)?;
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(Stopped {
            status,
            killed: true,
        })
    }
}

impl AsFd for Child {
    /// The pidfd: readable once the child has exited.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.pidfd.as_fd()
    }
}

impl Drop for Child {
    /// A child still running here is left over from an error path: it must not outlive us.
    fn drop(&mut self) {
        if matches!(self.try_wait(), Ok(None)) {
            let _ = self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// `exited with status 3`, `killed by SIGKILL`: for messages.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by {}", signals::name(sig)),
        _ => status.to_string(),
    }
}

/// The status as a shell reports it: the exit code, or 128 + the signal that ended it.
pub fn shell_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => 128u8.saturating_add(sig as u8),
        _ => 1,
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh descriptor (close-on-exec) that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: forever); returns which
/// were readable.
pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::from_borrowed_fd(*fd, PollFlags::IN))
        .collect();
    let ts = timeout.map(|t| Timespec {
        tv_sec: t.as_secs() as i64,
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    match rustix::event::poll(&mut pfds, ts.as_ref()) {
        Ok(_) | Err(rustix::io::Errno::INTR) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(pfds.iter().map(|p| !p.revents().is_empty()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_with_sigterm_and_kills_what_ignores_it() {
        let mut c = Child::spawn("sleep", sh("exec sleep 30"), None).unwrap();
        let s = c.stop(Duration::from_secs(5), None).unwrap();
        assert_eq!(s.status.signal(), Some(libc::SIGTERM));
        assert!(!s.killed);

        let mut c = Child::spawn("stubborn", sh("trap '' TERM; sleep 30 & wait"), None).unwrap();
        // Let the shell install its trap before the signal comes.
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        let s = c.stop(Duration::from_millis(300), None).unwrap();
        assert!(s.killed);
        assert_eq!(s.status.signal(), Some(libc::SIGKILL));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn exit_codes_as_a_shell_reports_them() {
        let mut c = Child::spawn("exit", sh("exit 3"), None).unwrap();
        let st = c.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(shell_code(st), 3);
        assert_eq!(describe(st), "exited with status 3");
        let mut c = Child::spawn("kill", sh("kill -9 $$"), None).unwrap();
        let st = c.wait_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(shell_code(st), 137);
        assert_eq!(describe(st), "killed by SIGKILL");
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }
}
