//! Reads and writes a queue thread does itself, synchronously, before (or instead of) handing
//! them to io_uring.
//!
//! io_uring first tries every read and write without blocking and punts it to a kernel worker
//! thread when that fails. That punt costs two thread wakeups per request, and some
//! filesystems make it happen every time: tmpfs has no non-blocking mode at all (RWF_NOWAIT
//! gets EOPNOTSUPP), so every tmpfs request goes through a worker even though its data is a
//! memory copy away. Doing the copy on the queue thread is then both faster and cheaper. On
//! other filesystems `RWF_NOWAIT` asks the kernel for the same promise explicitly: the request
//! completes here if it can without waiting (a page-cache hit) and fails with EAGAIN
//! otherwise, and only then goes to io_uring.
//!
//! Nothing here is used with O_DIRECT: a synchronous direct read waits for the device, which
//! would serialise the queue behind it.

use std::io;
use std::os::fd::RawFd;

/// How a queue thread may do one kind of operation on a disk itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InlineIo {
    /// Never: everything goes to io_uring.
    Never,
    /// With `RWF_NOWAIT`: only what completes without blocking; EAGAIN goes to io_uring.
    NoWait,
    /// Plainly: the filesystem keeps its data in memory (tmpfs, ramfs, hugetlbfs) and has no
    /// non-blocking mode, so io_uring would punt every request to a worker thread.
    Memory,
}

/// What an inline attempt did.
#[derive(Debug)]
pub enum Attempt {
    /// This many bytes were transferred (fewer than asked: the rest is for io_uring).
    Done(usize),
    /// It would have blocked: hand it to io_uring.
    WouldBlock,
    /// The file refuses `RWF_NOWAIT` for this operation: stop trying it inline.
    Unsupported,
    Failed(io::Error),
}

/// `preadv2` (`write`: `pwritev2`, with `RWF_DSYNC` when `dsync`) at `offset` into or from
/// `count` iovecs at `iov`, as `mode` allows.
///
/// # Safety
/// The iovecs and the buffers they describe must be valid for the duration of the call (and,
/// for a read, writable).
pub unsafe fn transfer(
    fd: RawFd,
    write: bool,
    iov: *const libc::iovec,
    count: u32,
    offset: u64,
    mode: InlineIo,
    dsync: bool,
) -> Attempt {
    let mut flags = match mode {
        InlineIo::Never => return Attempt::WouldBlock,
        InlineIo::NoWait => libc::RWF_NOWAIT,
        InlineIo::Memory => 0,
    };
    if write && dsync {
        flags |= libc::RWF_DSYNC;
    }
    let count = count.min(libc::c_int::MAX as u32) as libc::c_int;
    loop {
        // SAFETY: forwarded to the caller, who guarantees the iovecs and their buffers.
        let done = unsafe {
            if write {
                libc::pwritev2(fd, iov, count, offset as libc::off_t, flags)
            } else {
                libc::preadv2(fd, iov, count, offset as libc::off_t, flags)
            }
        };
        if done >= 0 {
            return Attempt::Done(done as usize);
        }
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => Attempt::WouldBlock,
            Some(libc::EOPNOTSUPP) if mode == InlineIo::NoWait => Attempt::Unsupported,
            _ => Attempt::Failed(e),
        };
    }
}

/// The policy for reads of a file opened without O_DIRECT: `Memory` on filesystems that keep
/// their data in memory, `NoWait` where a non-blocking read is accepted, otherwise `Never`.
/// The probe tries a one-byte non-blocking read at offset 0 (files of size 0 skip it).
pub fn read_policy(fd: RawFd, size: u64) -> InlineIo {
    if in_memory(fd) {
        return InlineIo::Memory;
    }
    if size == 0 {
        return InlineIo::NoWait;
    }
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&raw mut byte).cast(),
        iov_len: 1,
    };
    // SAFETY: one iovec describing `byte`, which lives across the call.
    match unsafe { transfer(fd, false, &iov, 1, 0, InlineIo::NoWait, false) } {
        Attempt::Done(_) | Attempt::WouldBlock => InlineIo::NoWait,
        Attempt::Unsupported | Attempt::Failed(_) => InlineIo::Never,
    }
}

/// The policy for writes of a file opened without O_DIRECT. Writes are not probed (a probe
/// would have to write): `NoWait` is tried and dropped at the first EOPNOTSUPP.
pub fn write_policy(fd: RawFd) -> InlineIo {
    if in_memory(fd) {
        InlineIo::Memory
    } else {
        InlineIo::NoWait
    }
}

/// Whether `fd` is a regular file on a filesystem whose data lives in memory. Only regular
/// files: a block device node sits on devtmpfs (a tmpfs) too, but its data is on the device,
/// and copies into its page cache would skip the `RWF_DSYNC` of a write-through device.
fn in_memory(fd: RawFd) -> bool {
    const RAMFS_MAGIC: libc::c_long = 0x8584_58f6;
    // SAFETY: fd is borrowed for this call only; the caller keeps it open.
    let file = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    match rustix::fs::fstat(file) {
        Ok(stat)
            if rustix::fs::FileType::from_raw_mode(stat.st_mode)
                == rustix::fs::FileType::RegularFile => {}
        _ => return false,
    }
    // SAFETY: statfs is plain data; fstatfs fills it or fails.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid statfs to fill.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as libc::c_long;
    kind == libc::TMPFS_MAGIC as libc::c_long
        || kind == RAMFS_MAGIC
        || kind == libc::HUGETLBFS_MAGIC as libc::c_long
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn only_regular_files_count_as_memory() {
        let file = tempfile::tempfile_in("/dev/shm").unwrap();
        assert!(in_memory(file.as_raw_fd()), "a tmpfs file");
        // A device node on devtmpfs: its data is not the filesystem's.
        let null = std::fs::File::open("/dev/null").unwrap();
        assert!(!in_memory(null.as_raw_fd()), "a device node");
        assert_eq!(write_policy(null.as_raw_fd()), InlineIo::NoWait);
    }

    fn read_at(
        file: &std::fs::File,
        offset: u64,
        len: usize,
        mode: InlineIo,
    ) -> (Attempt, Vec<u8>) {
        let mut buf = vec![0u8; len];
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        // SAFETY: the iovec describes `buf`, alive across the call.
        let attempt = unsafe { transfer(file.as_raw_fd(), false, &iov, 1, offset, mode, false) };
        (attempt, buf)
    }

    #[test]
    fn shm_is_memory_and_reads_inline() {
        let mut file = tempfile::tempfile_in("/dev/shm").expect("tmpfile in /dev/shm");
        file.write_all(b"hello, inline world").unwrap();
        assert_eq!(read_policy(file.as_raw_fd(), 19), InlineIo::Memory);
        assert_eq!(write_policy(file.as_raw_fd()), InlineIo::Memory);
        let (attempt, buf) = read_at(&file, 7, 6, InlineIo::Memory);
        assert!(matches!(attempt, Attempt::Done(6)), "{attempt:?}");
        assert_eq!(&buf, b"inline");
        // What makes Memory necessary: tmpfs refuses RWF_NOWAIT.
        let (attempt, _) = read_at(&file, 0, 4, InlineIo::NoWait);
        assert!(matches!(attempt, Attempt::Unsupported), "{attempt:?}");
    }

    #[test]
    fn a_cached_read_on_a_disk_filesystem_completes_without_waiting() {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![7u8; 8192]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        if in_memory(file.as_raw_fd()) {
            return; // /var/tmp is in memory on this machine: the shm test covers it
        }
        assert_eq!(read_policy(file.as_raw_fd(), 8192), InlineIo::NoWait);
        let (attempt, buf) = read_at(&file, 4096, 4096, InlineIo::NoWait);
        assert!(
            matches!(attempt, Attempt::Done(4096)),
            "just written, so cached: {attempt:?}"
        );
        assert!(buf.iter().all(|&b| b == 7));
    }

    #[test]
    fn never_does_nothing() {
        let file = tempfile::tempfile_in("/dev/shm").unwrap();
        let (attempt, _) = read_at(&file, 0, 1, InlineIo::Never);
        assert!(matches!(attempt, Attempt::WouldBlock));
    }
}
