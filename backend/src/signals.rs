//! Signals delivered through a signalfd, so that a loop sees them as events: SIGINT and SIGTERM
//! for the daemons, and SIGHUP as well for `vublk top` on a terminal (top/terminal.rs).

use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks SIGINT and SIGTERM in the calling thread (threads created later inherit the
    /// mask) and returns a signalfd that reports them.
    pub fn block_and_watch() -> io::Result<Signals> {
        Signals::block_and_watch_these(&[libc::SIGINT, libc::SIGTERM])
    }

    /// Blocks `signals` in the calling thread (threads created later inherit the mask) and
    /// returns a signalfd that reports them.
    pub fn block_and_watch_these(signals: &[libc::c_int]) -> io::Result<Signals> {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set; sigaddset and pthread_sigmask only read and
        // write that set and the thread's mask.
        let set = unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            let mut set = set.assume_init();
            for &signal in signals {
                libc::sigaddset(&mut set, signal);
            }
            // It returns its error number; errno is left alone.
            let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if ret != 0 {
                return Err(io::Error::from_raw_os_error(ret));
            }
            set
        };
        // SAFETY: creates a new fd from a valid set.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Signals { fd })
    }

    /// Reads one pending signal and names it.
    pub fn read(&self) -> &'static str {
        let mut info = MaybeUninit::<libc::signalfd_siginfo>::zeroed();
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into the zeroed buffer we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), info.as_mut_ptr().cast(), size) };
        if n != size as isize {
            return "signal";
        }
        // SAFETY: the read filled the structure completely.
        match unsafe { info.assume_init() }.ssi_signo as i32 {
            libc::SIGINT => "SIGINT",
            libc::SIGTERM => "SIGTERM",
            libc::SIGHUP => "SIGHUP",
            _ => "signal",
        }
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Signals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
