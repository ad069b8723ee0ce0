//! A request's guest buffers as one owned value: the memory generation they were found in, the
//! pins on the regions they lie in, their host iovecs and the chain's status byte.
//!
//! ```text
//!  parser ──▶ RawBuffers (host iovecs, nothing pinned) ──▶ Generation::pin ──▶ GuestBuffers
//!                  ▲                                                            │ engine I/O,
//!                  └──────────── release(): pins dropped, capacity kept ◀───────┘ status, used
//! ```
//!
//! Everything that makes a host pointer into guest memory safe to use lives here, in one type:
//! while a [`GuestBuffers`] exists, its generation (and so every mapping it was built from)
//! stays mapped, and the regions its iovecs and status byte lie in are pinned against
//! retirement (pin.rs). An engine that owns the value until the operation's completion is
//! reaped therefore never leaves the kernel a pointer into memory the frontend took back. The
//! copies in and out of guest memory, zeroing and the status byte are safe methods; only the
//! iovecs handed to the kernel (io_uring, `preadv2`) need `unsafe`, at that edge.
//!
//! The value is one pointer to a heap block that goes from request to request ([`RawBuffers`]
//! between them), vectors and all: moving a request's buffers to the engine and back copies a
//! pointer, and the steady state allocates nothing.

use std::ptr::NonNull;
use std::sync::Arc;

use super::dirty_log::LogMap;
use super::memory::Generation;
use super::pin::RegionPin;

/// What both states share, on the heap.
#[derive(Debug, Default)]
struct Parts {
    /// Indices of the regions (in `generation`) pinned for the request, each once; unpinned on
    /// drop, before the generation (and maybe the mappings) goes. An index rather than an `Arc`
    /// of the pin: the generation keeps the pins alive.
    pinned: Vec<u16>,
    iovecs: Vec<libc::iovec>,
    /// The first iovec not yet consumed by [`GuestBuffers::advance`].
    next: usize,
    /// Bytes left in `iovecs[next..]`.
    len: u64,
    /// Bytes [`GuestBuffers::advance`] took off the front of `iovecs[next]`, so the dirty log
    /// can still mark the whole buffer.
    skipped: usize,
    status: Option<NonNull<u8>>,
    complete: bool,
    /// `Some` while pinned (a [`GuestBuffers`]), `None` in [`RawBuffers`].
    generation: Option<Arc<Generation>>,
}

// SAFETY: while `generation` is `None` the pointers are addresses nothing dereferences; while
// it is `Some`, they point into guest memory that generation keeps mapped and `pinned` pins,
// both owned here, and whoever owns the value (one queue thread, or an engine holding it for
// the kernel) is the only user of the buffers.
unsafe impl Send for Parts {}

impl Parts {
    fn unpin(&mut self) {
        if let Some(generation) = &self.generation {
            for index in self.pinned.drain(..) {
                generation.region_pin(usize::from(index)).unpin();
            }
        }
    }
}

impl Drop for Parts {
    fn drop(&mut self) {
        self.unpin();
    }
}

/// Host iovecs of a parsed chain, not yet pinned: plain addresses that nothing dereferences.
/// Also what a released [`GuestBuffers`] gives back, so its allocations are reused.
#[derive(Debug, Default)]
pub struct RawBuffers(Box<Parts>);

impl RawBuffers {
    /// The vector the parser fills with a chain's host iovecs.
    pub fn iovecs_mut(&mut self) -> &mut Vec<libc::iovec> {
        &mut self.0.iovecs
    }
}

/// The guest memory a request reads or writes: pinned from [`Generation::pin`] until dropped or
/// [released](GuestBuffers::release).
///
/// Invariant: `generation` is `Some`, and every iovec (from `next` on) and the status byte lie
/// inside regions of it listed in `pinned`, each pinned once by this value. When any buffer
/// could not be pinned the iovecs are empty, so nothing but the status byte can be written.
#[derive(Debug)]
pub struct GuestBuffers(Box<Parts>);

/// A request's status byte in guest memory, as [`GuestBuffers::status_byte`] gave it: for
/// direct completion (virtio_blk/direct.rs), where a thread other than the buffers' owner
/// writes the status while the owner keeps them pinned.
#[derive(Debug, Clone, Copy)]
pub struct StatusByte(NonNull<u8>);

// SAFETY: an address; it is written only through `StatusByte::write`, whose caller promises the
// buffers it came from are still pinned.
unsafe impl Send for StatusByte {}

impl StatusByte {
    /// Writes `status`.
    ///
    /// # Safety
    /// The [`GuestBuffers`] this came from must still be pinned (not released), and nothing
    /// else may write the status at the same time.
    pub unsafe fn write(self, status: u8) {
        // SAFETY: the status byte lies in a region the buffers pin (the caller's promise), of
        // the generation they keep mapped.
        unsafe { self.0.as_ptr().write_volatile(status) };
    }
}

impl GuestBuffers {
    /// Pins what `raw` and `status` point at in `generation` (see [`Generation::pin`]).
    pub(super) fn pin(
        generation: &Arc<Generation>,
        raw: RawBuffers,
        status: Option<*const u8>,
    ) -> GuestBuffers {
        let mut parts = raw.0;
        debug_assert!(parts.pinned.is_empty() && parts.generation.is_none());
        parts.generation = Some(generation.clone());
        let Parts { pinned, iovecs, .. } = &mut *parts;
        // The status byte first: without it not even a status may be written.
        let status = status
            .filter(|&at| pin_range(generation, pinned, at as usize, 1))
            .and_then(|at| NonNull::new(at.cast_mut()));
        let complete = status.is_some()
            && iovecs
                .iter()
                .all(|v| pin_range(generation, pinned, v.iov_base as usize, v.iov_len));
        if !complete {
            iovecs.clear();
        }
        parts.len = parts.iovecs.iter().map(|v| v.iov_len as u64).sum();
        parts.next = 0;
        parts.skipped = 0;
        parts.status = status;
        parts.complete = complete;
        GuestBuffers(parts)
    }

    /// Whether the status byte and every buffer are pinned: the request may go ahead. When
    /// not, the buffers are empty and only the status byte (if pinned) can be written.
    pub fn is_complete(&self) -> bool {
        self.0.complete
    }

    /// Bytes left in the buffers.
    pub fn len(&self) -> u64 {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// The iovecs left, for the kernel. They stay valid, and their array stays where it is,
    /// while this value lives (moving it does not move the array).
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.0.iovecs[self.0.next..]
    }

    /// Moves past `done` bytes (a short read or write), at most what is left.
    pub fn advance(&mut self, done: u64) {
        let parts = &mut *self.0;
        let mut left = done.min(parts.len);
        parts.len -= left;
        while left > 0 {
            let v = &mut parts.iovecs[parts.next];
            if left >= v.iov_len as u64 {
                left -= v.iov_len as u64;
                // Consumed: put back what earlier short steps took off, for the dirty log.
                v.iov_base = v.iov_base.cast::<u8>().wrapping_sub(parts.skipped).cast();
                v.iov_len += parts.skipped;
                parts.skipped = 0;
                parts.next += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(left as usize).cast();
                v.iov_len -= left as usize;
                parts.skipped += left as usize;
                left = 0;
            }
        }
    }

    /// Copies `data` into the buffers, from the start of what is left; returns the bytes
    /// copied (fewer than `data` when the buffers are shorter).
    pub fn copy_in(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        for v in self.iovecs() {
            let n = v.iov_len.min(data.len() - at);
            // SAFETY: the iovec lies in guest memory that the generation keeps mapped and the
            // pins pin (the type's invariant); `n` is within both it and `data`, which is ours
            // and so not guest memory.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), v.iov_base.cast(), n) };
            at += n;
            if at == data.len() {
                break;
            }
        }
        at
    }

    /// Copies what is left of the buffers into `out`, up to its length; returns the bytes
    /// copied.
    pub fn copy_out(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        for v in self.iovecs() {
            let n = v.iov_len.min(out.len() - at);
            // SAFETY: as in copy_in, in the other direction.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>(), out[at..].as_mut_ptr(), n)
            };
            at += n;
            if at == out.len() {
                break;
            }
        }
        at
    }

    /// Fills what is left of the buffers with zeroes.
    pub fn zero(&mut self) {
        for v in self.iovecs() {
            // SAFETY: guest memory kept mapped and pinned by this value (the invariant).
            unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0, v.iov_len) };
        }
    }

    /// The request's status byte, for another thread to write while this value stays pinned
    /// ([`StatusByte`]); `None` when the chain has none this value could pin.
    pub fn status_byte(&self) -> Option<StatusByte> {
        self.0.status.map(StatusByte)
    }

    /// Writes the request's status byte; `false` when the chain has none this value could pin.
    pub fn write_status(&mut self, status: u8) -> bool {
        let Some(at) = self.0.status else {
            return false;
        };
        // SAFETY: the status byte lies in a region this value pins, of the generation it keeps
        // mapped; the parser took it from a device-writable descriptor.
        unsafe { at.as_ptr().write_volatile(status) };
        true
    }

    /// Marks the status byte's page in the dirty log, and with `data` the pages of every
    /// buffer (the whole buffers, also what [`GuestBuffers::advance`] moved past). `false` if
    /// some of it lies beyond the log.
    pub fn mark_dirty(&self, log: &LogMap, data: bool) -> bool {
        let parts = &*self.0;
        let Some(generation) = &parts.generation else {
            return true;
        };
        let mut inside = true;
        let mut mark = |host: usize, len: usize| {
            if let Some(gpa) = generation.host_to_guest(host) {
                inside &= log.mark(gpa, len as u64);
            }
        };
        if let Some(status) = parts.status {
            mark(status.as_ptr() as usize, 1);
        }
        if data {
            for (i, v) in parts.iovecs.iter().enumerate() {
                let skipped = if i == parts.next { parts.skipped } else { 0 };
                mark(
                    (v.iov_base as usize).wrapping_sub(skipped),
                    v.iov_len + skipped,
                );
            }
        }
        inside
    }

    /// Whether the buffers or the status byte lie in any of `regions`.
    pub fn uses_any(&self, regions: &[Arc<RegionPin>]) -> bool {
        let Some(generation) = &self.0.generation else {
            return false;
        };
        self.0.pinned.iter().any(|&i| {
            let pin = generation.region_pin(usize::from(i));
            regions.iter().any(|r| Arc::ptr_eq(pin, r))
        })
    }

    /// Unpins everything and lets the generation go; returns the allocations for the next
    /// request. Call it once the request's status and used entry are written.
    pub fn release(self) -> RawBuffers {
        let mut parts = self.0;
        parts.unpin();
        parts.iovecs.clear();
        parts.next = 0;
        parts.len = 0;
        parts.skipped = 0;
        parts.status = None;
        parts.complete = false;
        parts.generation = None;
        RawBuffers(parts)
    }
}

/// Pins the region of `generation` holding `[start, start + len)` for a request, recording it
/// in `pinned` (once per region); `false` if no region holds it all or the region is retiring.
fn pin_range(generation: &Generation, pinned: &mut Vec<u16>, start: usize, len: usize) -> bool {
    let Some(index) = generation
        .region_index(start, len)
        .and_then(|i| u16::try_from(i).ok())
    else {
        return false;
    };
    if pinned.contains(&index) {
        return true;
    }
    if !generation.region_pin(usize::from(index)).try_pin() {
        return false;
    }
    pinned.push(index);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vhost_user::memory::test_memory;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    const LOW: (u64, u64) = (0, 1 << 20);
    const HIGH: (u64, u64) = (1 << 30, 1 << 20);

    fn host(generation: &Generation, gpa: u64) -> *mut u8 {
        generation
            .memory()
            .get_host_address(GuestAddress(gpa))
            .expect("a guest address in the table")
    }

    fn raw(iovecs: &[(*mut u8, usize)]) -> RawBuffers {
        let mut raw = RawBuffers::default();
        raw.iovecs_mut()
            .extend(iovecs.iter().map(|&(base, len)| libc::iovec {
                iov_base: base.cast(),
                iov_len: len,
            }));
        raw
    }

    fn in_flight(generation: &Generation) -> Vec<usize> {
        generation.pins().iter().map(|p| p.in_flight()).collect()
    }

    #[test]
    fn pins_each_region_once_and_release_unpins() {
        let memory = test_memory(&[LOW, HIGH]);
        let generation = memory.current();
        let low = host(&generation, 0x1000);
        let high = host(&generation, HIGH.0 + 0x2000);
        let status = host(&generation, 0x3000);
        let buffers = generation.pin(raw(&[(low, 512), (high, 512), (low, 8)]), Some(status));
        assert!(buffers.is_complete());
        assert_eq!(buffers.len(), 1032);
        assert_eq!(in_flight(&generation), [1, 1], "one pin per region");
        assert!(buffers.uses_any(&[generation.pins()[1].clone()]));
        let raw = buffers.release();
        assert_eq!(in_flight(&generation), [0, 0]);
        assert!(raw.0.iovecs.is_empty() && raw.0.pinned.is_empty());
        assert!(raw.0.generation.is_none(), "the generation is let go");
        assert!(
            raw.0.iovecs.capacity() >= 3,
            "the vectors are kept for the next request"
        );
    }

    #[test]
    fn dropping_the_buffers_unpins_too() {
        let memory = test_memory(&[LOW]);
        let generation = memory.current();
        let buffers = generation.pin(raw(&[]), Some(host(&generation, 0x10)));
        assert_eq!(in_flight(&generation), [1]);
        drop(buffers);
        assert_eq!(in_flight(&generation), [0]);
    }

    #[test]
    fn buffers_outside_the_generation_or_retiring_are_refused() {
        let memory = test_memory(&[LOW, HIGH]);
        let generation = memory.current();
        let status = host(&generation, 0x3000);
        let mut outside = [0u8; 16];
        let buffers = generation.pin(raw(&[(outside.as_mut_ptr(), 16)]), Some(status));
        assert!(!buffers.is_complete(), "a buffer outside guest memory");
        assert!(
            buffers.iovecs().is_empty(),
            "nothing but the status can be written"
        );
        drop(buffers);
        // Running past the end of its region.
        let end = host(&generation, LOW.1 - 8);
        let buffers = generation.pin(raw(&[(end, 16)]), Some(status));
        assert!(
            !buffers.is_complete(),
            "a buffer past the end of its region"
        );
        drop(buffers);
        // The high region retires: its buffers are refused, the status byte still works.
        let high = host(&generation, HIGH.0);
        generation.pins()[1].retire();
        let mut buffers = generation.pin(raw(&[(high, 16)]), Some(status));
        assert!(!buffers.is_complete());
        assert!(buffers.write_status(5));
        drop(buffers);
        // A status byte in a retiring region: nothing at all.
        let mut buffers = generation.pin(raw(&[]), Some(high.cast_const()));
        assert!(!buffers.write_status(5));
        drop(buffers);
        assert_eq!(
            in_flight(&generation),
            [0, 0],
            "failed pins leave nothing behind"
        );
        assert_eq!(
            generation
                .memory()
                .read_obj::<u8>(GuestAddress(0x3000))
                .unwrap(),
            5
        );
    }

    #[test]
    fn the_dirty_log_gets_whole_buffers_after_short_steps() {
        use crate::vhost_user::dirty_log::LOG_PAGE;
        use std::os::unix::fs::FileExt;
        let memory = test_memory(&[LOW, HIGH]);
        let generation = memory.current();
        let status = host(&generation, 0x3000);
        // Pages 1-2 (one buffer straddling them) and one page of the high region.
        let a = host(&generation, 0x1f00);
        let b = host(&generation, HIGH.0 + 0x5000);
        let file = tempfile::tempfile_in("/dev/shm").unwrap();
        file.set_len(40 << 10).unwrap();
        let log = LogMap::map(&file, 40 << 10, 0, HIGH.0 + HIGH.1).unwrap();
        let mut buffers = generation.pin(raw(&[(a, 0x200), (b, 16)]), Some(status));
        // Short reads: part of the first buffer, then the rest of it and part of the second.
        buffers.advance(0x180);
        buffers.advance(0x88);
        assert!(buffers.mark_dirty(&log, false));
        let page = |gpa: u64| {
            let mut byte = [0u8];
            file.read_exact_at(&mut byte, gpa / LOG_PAGE / 8).unwrap();
            byte[0] & (1 << (gpa / LOG_PAGE % 8)) != 0
        };
        assert!(page(0x3000), "the status byte");
        assert!(
            !page(0x1000) && !page(HIGH.0 + 0x5000),
            "no data without `data`"
        );
        assert!(buffers.mark_dirty(&log, true));
        assert!(page(0x1000) && page(0x2000), "the whole first buffer");
        assert!(page(HIGH.0 + 0x5000), "the whole second buffer");
        assert!(!page(0x4000) && !page(0));
    }

    #[test]
    fn copies_zeroes_and_advances_across_iovecs() {
        let memory = test_memory(&[LOW]);
        let generation = memory.current();
        let mem = generation.memory();
        let status = host(&generation, 0x3000);
        let a = host(&generation, 0x1000);
        let b = host(&generation, 0x2000);
        let mut buffers = generation.pin(raw(&[(a, 3), (b, 5)]), Some(status));
        assert_eq!(
            buffers.copy_in(b"abcdefghij"),
            8,
            "as much as the buffers hold"
        );
        assert_eq!(
            mem.read_obj::<[u8; 3]>(GuestAddress(0x1000)).unwrap(),
            *b"abc"
        );
        assert_eq!(
            mem.read_obj::<[u8; 5]>(GuestAddress(0x2000)).unwrap(),
            *b"defgh"
        );
        let mut out = [0u8; 8];
        assert_eq!(buffers.copy_out(&mut out), 8);
        assert_eq!(&out, b"abcdefgh");
        buffers.advance(4);
        assert_eq!(buffers.len(), 4);
        assert_eq!(buffers.iovecs().len(), 1);
        assert_eq!(buffers.iovecs()[0].iov_base as usize, b as usize + 1);
        let mut rest = [0u8; 4];
        assert_eq!(buffers.copy_out(&mut rest), 4);
        assert_eq!(&rest, b"efgh");
        buffers.zero();
        assert_eq!(
            mem.read_obj::<[u8; 5]>(GuestAddress(0x2000)).unwrap(),
            *b"d\0\0\0\0"
        );
        assert!(buffers.write_status(0));
        buffers.advance(100);
        assert!(buffers.is_empty() && buffers.iovecs().is_empty());
    }
}
