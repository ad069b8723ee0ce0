//! An image on a memory filesystem (tmpfs, ramfs, hugetlbfs), mapped: reads and writes become
//! copies between guest memory and the page cache, with no system call at all.
//!
//! A `preadv2` of 4 KiB from tmpfs costs about 2.3 µs here, most of it the system call and the
//! page-cache lookup; a copy from the mapping about 0.7 µs. Only memory filesystems are mapped:
//! their data is in memory by definition, so a copy never waits for a device.
//!
//! **Truncation.** Touching a mapped page past the end of the file raises SIGBUS, and the image
//! is the VMM's user's file: they may shrink it under us. The mapping is registered with the
//! process's SIGBUS handler (`sigbus.rs`), which maps a zero page over a faulting page and
//! marks the mapping broken, so the copy finishes. The request that touched it fails with
//! IOERR, and the disk stops using the mapping (system calls report the short file from then
//! on).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::sigbus;

pub struct MappedImage {
    base: *mut u8,
    len: usize,
    guard: sigbus::Guard,
}

// SAFETY: the mapping is shared memory owned by this value until it is dropped; copies into and
// out of it are plain memory accesses that any thread may make.
unsafe impl Send for MappedImage {}
// SAFETY: as above; concurrent copies to the same bytes race only as concurrent writes to a file
// would, which the guest's I/O ordering already rules out.
unsafe impl Sync for MappedImage {}

impl MappedImage {
    /// Maps the first `len` bytes of `file` (writable unless `read_only`).
    pub fn new(file: &File, len: u64, read_only: bool) -> io::Result<MappedImage> {
        let len = usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        if len == 0 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let prot = if read_only {
            libc::PROT_READ
        } else {
            libc::PROT_READ | libc::PROT_WRITE
        };
        // SAFETY: a new shared mapping of our own file at an address the kernel picks.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = base.cast::<u8>();
        let Some(guard) = sigbus::Guard::register(base as usize, len, 4096) else {
            // SAFETY: unmapping what was mapped above, which nothing else has seen.
            unsafe { libc::munmap(base.cast(), len) };
            return Err(io::Error::other("too many mappings guarded in one process"));
        };
        Ok(MappedImage { base, len, guard })
    }

    /// False once a copy touched a page past the end of the file (see the module docs).
    pub fn intact(&self) -> bool {
        self.guard.intact()
    }

    /// Copies `len` bytes at image offset `offset` to or from the buffers of `iov`.
    /// `false` if the range is outside the mapping or the file was found truncated.
    ///
    /// # Safety
    /// The iovecs must describe valid memory for the duration of the call (writable for a
    /// read), not overlapping the mapping.
    pub unsafe fn copy(&self, write: bool, iov: &[libc::iovec], offset: u64) -> bool {
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        let Some(end) = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(total))
        else {
            return false;
        };
        if end > self.len || !self.intact() {
            return false;
        }
        let mut at = offset as usize;
        for v in iov {
            // SAFETY: `at + iov_len <= end <= len`: inside the mapping; the iovec's buffer is
            // valid per the caller. A truncated file faults here; the handler makes the page
            // readable and writable again and marks the mapping broken.
            unsafe {
                let image = self.base.add(at);
                if write {
                    std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), image, v.iov_len);
                } else {
                    std::ptr::copy_nonoverlapping(image, v.iov_base.cast::<u8>(), v.iov_len);
                }
            }
            at += v.iov_len;
        }
        self.intact()
    }
}

impl std::fmt::Debug for MappedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedImage")
            .field("len", &self.len)
            .field("intact", &self.intact())
            .finish()
    }
}

impl Drop for MappedImage {
    fn drop(&mut self) {
        self.guard.unregister();
        // SAFETY: our own mapping; no copy runs any more (we are being dropped).
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    #[test]
    fn reads_and_writes_go_through_the_page_cache() {
        let mut file = tempfile::tempfile_in("/dev/shm").unwrap();
        file.write_all(&[1u8; 16384]).unwrap();
        let image = MappedImage::new(&file, 16384, false).unwrap();
        let mut data = [7u8; 100];
        let mut more = [8u8; 28];
        // SAFETY: the iovecs describe the local arrays.
        assert!(unsafe { image.copy(true, &[iov(&mut data), iov(&mut more)], 4000) });
        let mut back = vec![0u8; 130];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut back, 3999).unwrap();
        assert_eq!(back[0], 1);
        assert!(back[1..101].iter().all(|&b| b == 7));
        assert!(back[101..129].iter().all(|&b| b == 8));
        assert_eq!(back[129], 1);
        let mut read = [0u8; 128];
        // SAFETY: as above.
        assert!(unsafe { image.copy(false, &[iov(&mut read)], 4000) });
        assert_eq!(&read[..100], &[7u8; 100]);
        // Out of range: refused, nothing copied.
        // SAFETY: as above.
        assert!(!unsafe { image.copy(false, &[iov(&mut read)], 16384 - 64) });
    }

    #[test]
    fn a_truncated_file_breaks_the_mapping_not_the_process() {
        let mut file = tempfile::tempfile_in("/dev/shm").unwrap();
        file.write_all(&vec![3u8; 64 * 1024]).unwrap();
        let image = MappedImage::new(&file, 64 * 1024, false).unwrap();
        file.set_len(4096).unwrap();
        let mut buf = [0u8; 4096];
        // SAFETY: the iovec describes `buf`.
        let copied = unsafe { image.copy(false, &[iov(&mut buf)], 32 * 1024) };
        assert!(!copied, "copy past the new end must fail");
        assert!(!image.intact());
        // SAFETY: as above.
        let copied = unsafe { image.copy(false, &[iov(&mut buf)], 0) };
        assert!(!copied, "a broken mapping is not used again");
        drop(image);
        // The slot is free again and a new mapping is intact.
        let again = MappedImage::new(&file, 4096, true).unwrap();
        // SAFETY: as above.
        assert!(unsafe { again.copy(false, &[iov(&mut buf)], 0) });
        assert!(buf.iter().all(|&b| b == 3));
    }
}
