//! Aligned bounce buffers, for O_DIRECT requests whose guest buffers are not aligned the way
//! the backing needs. Only misaligned requests pay for the copy.
//!
//! Their size is bounded whatever the guest sends: a request is bounced [`CHUNK`] bytes at a
//! time (its pieces go to the disk one after the other), so a queue holds at most one
//! [`CHUNK`] per request in flight, and a buffer larger than [`KEEP`] is freed as soon as its
//! request completes, so what stays allocated between requests is at most [`KEEP`] per slot.

use std::alloc::{self, Layout};
use std::ptr::NonNull;

/// The most of a request that is bounced at once: one segment of the largest size a driver may
/// send (`size_max`). Longer requests, up to seg_max × size_max (aliased buffers included), go
/// through in pieces.
pub const CHUNK: usize = 1 << 20;

/// The largest bounce buffer a slot keeps for its next request: misaligned requests of up to
/// 64 KiB allocate nothing once their slot has a buffer.
pub const KEEP: usize = 64 << 10;

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
        // SAFETY: the layout has a non-zero size. Zeroed, so the bytes are initialized and can
        // be handed out as slices.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })?;
        Some(AlignedBuf { ptr, layout })
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The buffer's bytes (zeroed when allocated).
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len()` bytes allocated (and zeroed) in `new`, owned by this value.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}
