//! Aligned bounce buffers, for O_DIRECT requests whose guest buffers are not aligned the way
//! the backing needs. Only misaligned requests pay for the copy.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: the buffer is plain heap memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of at least `len` bytes aligned to `align` (a power of two); `None` when the
    /// allocation fails.
    pub fn new(len: usize, align: usize) -> Option<AlignedBuf> {
        let layout = Layout::from_size_align(len.max(1), align.max(4096)).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc::alloc(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Copies the data of `iovecs` into the buffer (a write's payload).
    ///
    /// # Safety
    /// The iovecs must point to live memory (pinned guest memory) totalling at most `len()`.
    pub unsafe fn gather(&mut self, iovecs: &[libc::iovec]) {
        let mut at = 0;
        for v in iovecs {
            // SAFETY: the caller guarantees the source; `at + iov_len <= len()` by the total.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    v.iov_base as *const u8,
                    self.as_ptr().add(at),
                    v.iov_len,
                )
            };
            at += v.iov_len;
        }
    }

    /// Copies the buffer out to `iovecs` (a read's data).
    ///
    /// # Safety
    /// As for [`AlignedBuf::gather`].
    pub unsafe fn scatter(&self, iovecs: &[libc::iovec]) {
        let mut at = 0;
        for v in iovecs {
            // SAFETY: as for gather, in the other direction.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self.as_ptr().add(at),
                    v.iov_base as *mut u8,
                    v.iov_len,
                )
            };
            at += v.iov_len;
        }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
