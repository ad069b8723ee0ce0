//! SIGINT, SIGTERM and SIGHUP to vmm-glue, as a file descriptor to poll.
//!
//! The signals are blocked in vmm-glue and read from a signalfd, so they arrive as events in the
//! same poll as the children's pidfds instead of interrupting it. A blocked mask survives fork
//! and exec, so the children clear it before exec (`child.rs`).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The signals that stop the launch.
pub const STOP_SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocked stop signals, readable from a signalfd. Dropping it unblocks them.
pub struct StopSignals {
    fd: OwnedFd,
    previous: libc::sigset_t,
}

impl StopSignals {
    /// Blocks [`STOP_SIGNALS`] in this thread and opens a signalfd for them. Call before any
    /// other thread exists, so none can take the signals instead.
    pub fn block() -> io::Result<Self> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset/sigaddset initialise and fill the set we own; pthread_sigmask
        // writes the old mask into `previous`, which we own; signalfd takes the initialised set
        // and returns a new descriptor (or -1) that we take ownership of below.
        let fd = unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            for s in STOP_SIGNALS {
                libc::sigaddset(set.as_mut_ptr(), s);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), previous.as_mut_ptr());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            libc::signalfd(-1, set.as_ptr(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
        };
        // SAFETY: pthread_sigmask succeeded, so it wrote the previous mask.
        let previous = unsafe { previous.assume_init() };
        if fd < 0 {
            let err = io::Error::last_os_error();
            restore(&previous);
            return Err(err);
        }
        // SAFETY: signalfd returned a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { fd, previous })
    }

    /// The next pending stop signal, if any (does not block).
    pub fn take(&self) -> io::Result<Option<i32>> {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::uninit();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`, which is that large; the descriptor is
        // ours and open for the duration of the call.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(e),
            };
        }
        if n as usize != size {
            return Ok(None);
        }
        // SAFETY: the kernel filled the whole structure (n == size).
        let info = unsafe { info.assume_init() };
        Ok(Some(info.ssi_signo as i32))
    }
}

impl AsFd for StopSignals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        restore(&self.previous);
    }
}

fn restore(mask: &libc::sigset_t) {
    // SAFETY: sets this thread's mask from an initialised set we own; no old mask is asked for.
    unsafe {
        libc::pthread_sigmask(libc::SIG_SETMASK, mask, std::ptr::null_mut());
    }
}

/// `SIGTERM` for 15, as people write it.
pub fn name(signal: i32) -> String {
    match signal {
        libc::SIGHUP => "SIGHUP".into(),
        libc::SIGINT => "SIGINT".into(),
        libc::SIGKILL => "SIGKILL".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGSEGV => "SIGSEGV".into(),
        libc::SIGABRT => "SIGABRT".into(),
        libc::SIGPIPE => "SIGPIPE".into(),
        n => format!("signal {n}"),
    }
}
