//! Fuzz targets for what a guest or a VMM hands vublk, one module per target. Each target's
//! body is a `run(&[u8])` here, so that libFuzzer's binaries (`fuzz_targets/`, built by
//! `scripts/fuzz.sh`) and the smoke test (`tests/replay.rs`, the seeds and every regression
//! replayed in the normal test suite) run the same code.
//!
//! - [`request`]: a guest's descriptor table, avail ring and buffers, popped and parsed into
//!   virtio-blk requests as a queue thread does;
//! - [`session`]: a VMM's vhost-user messages (with file descriptors) on a socket, handled by
//!   a [`vublk::vhost_user::Session`] of a null-disk device;
//! - [`memory`]: memory tables (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG, disconnect) against
//!   the generations of [`vublk::vhost_user::GuestMemoryHandle`];
//! - [`inflight`]: a queue's inflight region (SET_INFLIGHT_FD) read back when its ring starts,
//!   then written by the queue thread's tracker across a crash.
//!
//! A target panics when vublk breaks one of its invariants (a request accepted outside the
//! disk, buffers outside guest memory, overlapping regions installed, ...); libFuzzer reports
//! a panic as a crash, and so does any signal (SIGSEGV, SIGBUS) or an abort.
//!
//! Classes of input that once crashed a target are fed on purpose: memfds shorter than their
//! regions (refused, never mapped) and the tables that follow a refused SET_MEM_TABLE (the one
//! before it keeps serving); their first inputs are in `fuzz/regressions/TARGET/`.

use std::fs::File;
use std::os::fd::FromRawFd;

pub mod inflight;
pub mod memory;
pub mod request;
pub mod session;

/// A memfd of `len` bytes, or `None` when the kernel refuses that size (or the fd).
pub(crate) fn memfd(len: u64) -> Option<File> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"vublk-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).ok()?;
    Some(file)
}

/// An input, read front to back in a plain format (each target documents its own), so that
/// seeds are easy to write (`fuzz/make_seeds.py`). Every read is `None` past the end.
pub(crate) struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Input<'a> {
        Input(data)
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    pub(crate) fn u8(&mut self) -> Option<u8> {
        Some(self.bytes(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.bytes(2)?.try_into().ok()?))
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.bytes(8)?.try_into().ok()?))
    }
}
