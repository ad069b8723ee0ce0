//! The engine of a file or block device: one io_uring per queue thread, with the backing
//! registered as fixed file 0, and the paths that skip the ring when they can.
//!
//! ```text
//!  submit(tag, read/write) ─▶ O_DIRECT and misaligned buffers? ─▶ bounce buffer (bounce.rs),
//!        │                                                          1 MiB at a time
//!        │
//!        ├─ image on a memory filesystem ─▶ copy to/from the mapping (mapped.rs) ─▶ done
//!        ├─ buffered file ─▶ preadv2/pwritev2(RWF_NOWAIT) (inline.rs) ─▶ done, or the rest:
//!        └─▶ READV/WRITEV on the ring; a short one is advanced and resubmitted until done
//!  flush ─▶ FSYNC(DATASYNC)        discard ─▶ FALLOCATE(PUNCH_HOLE) per segment
//!  write-zeroes ─▶ ZERO_RANGE, or PUNCH_HOLE (UNMAP), or PUNCH_HOLE linked to ALLOCATE
//!  write-through discard, write-zeroes ─▶ the above, then FSYNC(DATASYNC) once they are done
//! ```
//!
//! Each request's state lives in a slot indexed by its tag, so io_uring's user_data is the tag
//! and nothing is allocated per request. A slot's bounce buffer is the exception, bounded
//! (bounce.rs): at most [`CHUNK`] bytes, a longer request going through it piece after piece;
//! one larger than [`KEEP`] is freed when its request completes.
//!
//! A slot is finished only when `pending`, its operations on the ring, is back to zero: an
//! operation that fails to be queued is recorded as the request's error, and the request
//! completes when the ones already queued have.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::squeue;

use crate::disk::{Backing, Disk, ZeroesMethod};
use crate::vhost_user::GuestBuffers;

use super::bounce::{AlignedBuf, CHUNK, KEEP};
use super::engine::{Completion, Engine, Event, Operation, Tag};
use super::inline::{self, Attempt, InlineIo};
use super::mapped::MappedImage;
use super::uring::{self, Reaped, Ring};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    /// Flush, discard, write-zeroes: no data moves.
    Other,
}

/// One request in flight.
struct Slot {
    /// Owned from submit until the completion hands them back.
    buffers: Option<GuestBuffers>,
    kind: Kind,
    dsync: bool,
    /// A discard or write-zeroes that must be durable: FSYNC(DATASYNC) once its operations
    /// are done (they may go to the kernel in several submissions, so a link cannot order
    /// them).
    sync_after: bool,
    /// For a read or write: where the rest goes, and how much is left.
    offset: u64,
    remaining: u64,
    /// Operations on the ring whose completions are outstanding.
    pending: u32,
    /// The first error.
    errno: Option<i32>,
    bounce: Option<AlignedBuf>,
    /// What is left of the current piece in the bounce buffer, when `bounced`.
    bounce_iov: libc::iovec,
    bounced: bool,
    /// The current piece's length, and what is left of it (the rest of the request is in
    /// `remaining`).
    piece: u64,
    piece_left: u64,
}

// SAFETY: `bounce_iov` points into `bounce`, owned by the slot; the buffers are Send. A slot is
// used only by the thread that uses the engine.
unsafe impl Send for Slot {}

impl Slot {
    fn new() -> Slot {
        Slot {
            buffers: None,
            kind: Kind::Other,
            dsync: false,
            sync_after: false,
            offset: 0,
            remaining: 0,
            pending: 0,
            errno: None,
            bounce: None,
            bounce_iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            bounced: false,
            piece: 0,
            piece_left: 0,
        }
    }

    /// The iovecs the next read or write should use.
    fn io_vectors(&self) -> (*const libc::iovec, u32) {
        match &self.buffers {
            Some(buffers) if !self.bounced => {
                let rest = buffers.iovecs();
                (rest.as_ptr(), rest.len() as u32)
            }
            _ => (&self.bounce_iov, 1),
        }
    }

    /// Moves past `done` bytes after a short read or write.
    fn advance(&mut self, done: u64) {
        let done = done.min(self.remaining);
        self.offset += done;
        self.remaining -= done;
        if self.bounced {
            let done = done.min(self.piece_left);
            self.piece_left -= done;
            self.bounce_iov.iov_base = self
                .bounce_iov
                .iov_base
                .cast::<u8>()
                .wrapping_add(done as usize)
                .cast();
            self.bounce_iov.iov_len -= done as usize;
        } else if let Some(buffers) = &mut self.buffers {
            buffers.advance(done);
        }
    }

    fn note_error(&mut self, errno: i32) {
        self.errno.get_or_insert(errno);
    }

    /// Bytes the next read or write is for: what is left of the request, or of its piece.
    fn wanted(&self) -> u64 {
        if self.bounced {
            self.piece_left
        } else {
            self.remaining
        }
    }

    /// A request is over: a large bounce buffer goes, so a slot does not keep for the life of
    /// the queue what one request needed.
    fn shrink(&mut self) {
        if self.bounce.as_ref().is_some_and(|b| b.len() > KEEP) {
            self.bounce = None;
        }
    }
}

/// The engine of a file or block device.
pub struct FileEngine {
    ring: Ring,
    slots: Vec<Slot>,
    /// The backing, for inline I/O. Owned by the device, which outlives its queues' engines.
    fd: RawFd,
    mapping: Option<Arc<MappedImage>>,
    /// O_DIRECT, and the alignment it needs of buffers in memory.
    direct: bool,
    align: usize,
    /// Whether reads and writes are tried on the queue thread first (inline.rs); a filesystem
    /// that refuses RWF_NOWAIT for writes turns that off at the first refusal.
    inline_read: InlineIo,
    inline_write: InlineIo,
    punch_hole: bool,
    zeroes: ZeroesMethod,
    cqes: Vec<uring::Completion>,
    /// The opcode of every operation queued on the ring, for the tests.
    #[cfg(test)]
    pub(super) queued: Vec<u8>,
}

impl FileEngine {
    /// An engine for `disk` (a file or block device) serving up to `depth` requests at once.
    /// `inline: false` sends every read and write through the ring.
    pub fn new(disk: &Disk, depth: u16, inline: bool) -> io::Result<FileEngine> {
        let Backing::File { file, .. } = &disk.backing else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the file engine needs a file",
            ));
        };
        let fd = file.as_raw_fd();
        let ring = Ring::new(ring_entries(depth), Some(fd))?;
        let inline_or_never = |policy| if inline { policy } else { InlineIo::Never };
        Ok(FileEngine {
            ring,
            slots: (0..depth).map(|_| Slot::new()).collect(),
            fd,
            mapping: disk.mapping.clone(),
            direct: disk.direct,
            align: disk.dio_align.memory.max(1) as usize,
            inline_read: inline_or_never(disk.inline_read),
            inline_write: inline_or_never(disk.inline_write),
            punch_hole: disk.punch_hole,
            zeroes: disk.write_zeroes.unwrap_or(ZeroesMethod::ZeroRange),
            cqes: Vec::with_capacity(usize::from(depth) + 2),
            #[cfg(test)]
            queued: Vec::new(),
        })
    }

    /// Takes the finished request out of its slot.
    fn done(&mut self, index: usize, inline: bool) -> Option<Completion> {
        let slot = &mut self.slots[index];
        let buffers = slot.buffers.take()?;
        slot.shrink();
        let result = match slot.errno {
            None => Ok(()),
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
        };
        Some(Completion {
            tag: index as Tag,
            result,
            inline,
            published: false,
            buffers,
        })
    }

    /// Fails the request in `index` with `error` before anything of it went to the ring.
    fn fail(&mut self, index: usize, error: io::Error) -> Option<Completion> {
        let slot = &mut self.slots[index];
        let buffers = slot.buffers.take()?;
        slot.shrink();
        Some(Completion::new(index as Tag, Err(error), buffers))
    }

    /// Queues one operation of the request in `index`; `false` (and the error noted) if the
    /// ring failed.
    fn push(&mut self, index: usize, entry: &squeue::Entry) -> bool {
        self.push_all(index, std::slice::from_ref(entry))
    }

    /// Queues operations of the request in `index` together (a linked chain), or none of them.
    fn push_all(&mut self, index: usize, entries: &[squeue::Entry]) -> bool {
        // SAFETY: the entries point at no memory, or at the slot's iovecs (in its buffers, whose
        // array does not move while the slot holds them, or its bounce iovec) and through them
        // at guest memory the buffers pin or at the bounce buffer. The slot keeps all of it
        // until `pending` is back to zero, i.e. until these entries' completions are reaped.
        match unsafe { self.ring.push_all(entries) } {
            Ok(()) => {
                self.slots[index].pending += entries.len() as u32;
                #[cfg(test)]
                self.queued
                    .extend(entries.iter().map(|e| e.get_opcode() as u8));
                true
            }
            Err(e) => {
                self.slots[index].note_error(e.raw_os_error().unwrap_or(libc::EIO));
                false
            }
        }
    }

    fn push_rw(&mut self, index: usize) -> bool {
        let slot = &self.slots[index];
        let (iov, count) = slot.io_vectors();
        let tag = index as u64;
        let entry = match slot.kind {
            Kind::Read => self.ring.readv(iov, count, slot.offset, tag),
            _ => self.ring.writev(iov, count, slot.offset, slot.dsync, tag),
        };
        self.push(index, &entry)
    }

    fn push_zeroes(&mut self, index: usize, offset: u64, len: u64, unmap: bool) -> bool {
        let tag = index as u64;
        if unmap && self.punch_hole {
            let punch = self.ring.fallocate(uring::PUNCH_HOLE, offset, len, tag);
            return self.push(index, &punch);
        }
        if self.zeroes == ZeroesMethod::PunchThenAllocate {
            let punch = self.ring.fallocate(uring::PUNCH_HOLE, offset, len, tag);
            let allocate = self.ring.fallocate(uring::ALLOCATE, offset, len, tag);
            return self.push_all(index, &[uring::linked(punch), allocate]);
        }
        let zero = self.ring.fallocate(uring::ZERO_RANGE, offset, len, tag);
        self.push(index, &zero)
    }

    /// O_DIRECT with guest buffers that are not aligned: go through an aligned copy, at most
    /// [`CHUNK`] bytes of it at a time (the request's length is the guest's choice, up to
    /// seg_max × size_max of aliased buffers).
    fn bounce(&mut self, index: usize) -> io::Result<()> {
        self.slots[index].bounced = true;
        self.next_piece(index)
    }

    /// Loads the next piece of a bounced request into the bounce buffer (a write's data is
    /// copied in) and points the bounce iovec at it.
    fn next_piece(&mut self, index: usize) -> io::Result<()> {
        let align = self.align;
        let slot = &mut self.slots[index];
        let len = slot.remaining.min(CHUNK as u64) as usize;
        if slot.bounce.as_ref().is_none_or(|b| b.len() < len) {
            slot.bounce = None;
            slot.bounce = Some(
                AlignedBuf::new(len, align)
                    .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?,
            );
        }
        let (Some(bounce), Some(buffers)) = (slot.bounce.as_mut(), slot.buffers.as_ref()) else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        if slot.kind == Kind::Write {
            buffers.copy_out(&mut bounce.as_mut_slice()[..len]);
        }
        slot.bounce_iov = libc::iovec {
            iov_base: bounce.as_ptr().cast(),
            iov_len: len,
        };
        slot.piece = len as u64;
        slot.piece_left = len as u64;
        Ok(())
    }

    /// A bounced piece is done: a read's data goes out to the guest, and the guest buffers
    /// move past the piece.
    fn end_piece(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        let (Some(bounce), Some(buffers)) = (&slot.bounce, &mut slot.buffers) else {
            return;
        };
        let piece = slot.piece as usize;
        if slot.kind == Kind::Read {
            buffers.copy_in(&bounce.as_slice()[..piece]);
        }
        buffers.advance(slot.piece);
    }

    /// Does a read or write on this thread if the disk allows it (inline.rs, mapped.rs).
    /// `Some` when the request is finished; otherwise what is left of it goes to the ring.
    fn try_inline(&mut self, index: usize) -> Option<Completion> {
        let slot = &mut self.slots[index];
        let write = slot.kind == Kind::Write;
        let mode = if write {
            self.inline_write
        } else {
            self.inline_read
        };
        // Bouncing is for O_DIRECT, which never runs inline (inline.rs).
        if mode == InlineIo::Never || slot.bounced {
            return None;
        }
        let mapping = self
            .mapping
            .as_ref()
            .filter(|m| mode == InlineIo::Memory && m.intact());
        if let Some(mapping) = mapping {
            let iovecs = slot.buffers.as_ref().map_or(&[][..], |b| b.iovecs());
            // SAFETY: the iovecs point into guest memory the slot's buffers pin, never into
            // the image; the copy is synchronous.
            let copied = unsafe { mapping.copy(write, iovecs, slot.offset) };
            let intact = mapping.intact();
            if copied {
                return self.done(index, true);
            }
            if !intact {
                // This copy found the file shrunk under the mapping (mapped.rs); later
                // requests use system calls, which see the new size.
                let error = io::Error::other("the image file was truncated while in use");
                return self.fail(index, error);
            }
        }
        let (iov, count) = slot.io_vectors();
        let dsync = write && slot.dsync;
        // SAFETY: the iovecs live in the slot's buffers (or its bounce iovec) and point into
        // guest memory they pin (or the bounce buffer); the call is synchronous.
        let attempt =
            unsafe { inline::transfer(self.fd, write, iov, count, slot.offset, mode, dsync) };
        match attempt {
            Attempt::Done(done) if done as u64 >= slot.remaining => self.done(index, true),
            // End of file inside the capacity: the image shrank under us.
            Attempt::Done(0) => self.fail(index, io::Error::from_raw_os_error(libc::EIO)),
            Attempt::Done(done) => {
                slot.advance(done as u64);
                None
            }
            Attempt::WouldBlock => None,
            Attempt::Unsupported => {
                let what = if write { "writes" } else { "reads" };
                tracing::debug!("the backing refuses RWF_NOWAIT for {what}; using io_uring only");
                if write {
                    self.inline_write = InlineIo::Never;
                } else {
                    self.inline_read = InlineIo::Never;
                }
                None
            }
            Attempt::Failed(e) => self.fail(index, e),
        }
    }

    /// One completion of a request's operations; `Some` with its last.
    fn complete_op(&mut self, index: usize, result: i32) -> Option<Completion> {
        let Some(slot) = self.slots.get_mut(index) else {
            tracing::error!("completion for unknown request {index}");
            return None;
        };
        slot.pending = slot.pending.saturating_sub(1);
        if result < 0 {
            // A linked operation cancelled because its predecessor failed keeps the first
            // error.
            slot.note_error(-result);
        } else if slot.kind != Kind::Other && slot.errno.is_none() {
            let done = result as u64;
            if done == 0 && slot.wanted() > 0 {
                // End of file inside the capacity: the image shrank under us.
                slot.note_error(libc::EIO);
            } else {
                slot.advance(done);
                if slot.bounced && slot.piece_left == 0 {
                    self.end_piece(index);
                    if self.slots[index].remaining > 0 {
                        match self.next_piece(index) {
                            Ok(()) => {
                                self.push_rw(index);
                            }
                            Err(e) => {
                                let errno = e.raw_os_error().unwrap_or(libc::ENOMEM);
                                self.slots[index].note_error(errno);
                            }
                        }
                    }
                } else if self.slots[index].wanted() > 0 {
                    // Short: the rest of it.
                    self.push_rw(index);
                }
            }
        }
        if self.slots[index].pending > 0 {
            return None;
        }
        let slot = &mut self.slots[index];
        if std::mem::take(&mut slot.sync_after) && slot.errno.is_none() {
            let entry = self.ring.fdatasync(index as u64);
            if self.push(index, &entry) {
                return None;
            }
        }
        self.done(index, false)
    }
}

impl Engine for FileEngine {
    fn start(&mut self) -> io::Result<()> {
        self.ring.enable()
    }

    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        buffers: GuestBuffers,
    ) -> Option<Completion> {
        let index = usize::from(tag);
        let Some(slot) = self.slots.get_mut(index).filter(|s| s.buffers.is_none()) else {
            tracing::error!("request {tag} submitted twice, or beyond the queue");
            let error = io::Error::from_raw_os_error(libc::EINVAL);
            return Some(Completion::new(tag, Err(error), buffers));
        };
        slot.pending = 0;
        slot.errno = None;
        slot.bounced = false;
        slot.kind = Kind::Other;
        slot.sync_after = false;
        match operation {
            Operation::Read { offset } | Operation::Write { offset, .. } => {
                slot.kind = if matches!(operation, Operation::Read { .. }) {
                    Kind::Read
                } else {
                    Kind::Write
                };
                slot.dsync = matches!(operation, Operation::Write { dsync: true, .. });
                slot.offset = offset;
                slot.remaining = buffers.len();
                let misaligned = self.direct && misaligned(buffers.iovecs(), self.align);
                slot.buffers = Some(buffers);
                if slot.remaining == 0 {
                    return self.done(index, false);
                }
                if misaligned {
                    if let Err(e) = self.bounce(index) {
                        return self.fail(index, e);
                    }
                }
                if let Some(done) = self.try_inline(index) {
                    return Some(done);
                }
                self.push_rw(index);
            }
            Operation::Flush => {
                slot.buffers = Some(buffers);
                let entry = self.ring.fdatasync(index as u64);
                self.push(index, &entry);
            }
            Operation::Discard { segments, dsync } => {
                slot.buffers = Some(buffers);
                slot.sync_after = dsync;
                for s in segments {
                    let entry =
                        self.ring
                            .fallocate(uring::PUNCH_HOLE, s.offset, s.len, index as u64);
                    if !self.push(index, &entry) {
                        break;
                    }
                }
            }
            Operation::WriteZeroes { segments, dsync } => {
                slot.buffers = Some(buffers);
                slot.sync_after = dsync;
                for s in segments {
                    if !self.push_zeroes(index, s.offset, s.len, s.unmap) {
                        break;
                    }
                }
            }
        }
        if self.slots[index].pending == 0 {
            // Nothing went to the ring (it failed, or there was nothing to do).
            return self.done(index, false);
        }
        None
    }

    fn cancel(&mut self, which: &dyn Fn(&GuestBuffers) -> bool) -> io::Result<()> {
        for index in 0..self.slots.len() {
            let slot = &self.slots[index];
            if slot.pending > 0 && slot.buffers.as_ref().is_some_and(which) {
                self.ring.cancel_ops(index as u64)?;
            }
        }
        Ok(())
    }

    fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> io::Result<()> {
        self.ring.watch(fd, len, token)
    }

    fn unwatch(&mut self, token: u32) -> io::Result<()> {
        self.ring.unwatch(token)
    }

    fn enter(&mut self, wait: bool) -> io::Result<()> {
        self.ring.submit(usize::from(wait)).map(drop)
    }

    fn enter_timeout(&mut self, timeout: Duration) -> io::Result<bool> {
        self.ring.submit_timeout(1, timeout)
    }

    fn has_events(&mut self) -> bool {
        self.ring.has_events()
    }

    fn reap(&mut self, events: &mut Vec<Event>) {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.completions(&mut cqes);
        for cqe in &cqes {
            match self.ring.classify(cqe) {
                Reaped::Cancel => {}
                Reaped::Watch(token, result) => events.push(Event::Watch { token, result }),
                Reaped::Op(tag, result) => {
                    if let Some(done) = self.complete_op(tag as usize, result) {
                        events.push(Event::Completed(done));
                    }
                }
            }
        }
        self.cqes = cqes;
    }
}

impl Drop for FileEngine {
    fn drop(&mut self) {
        if self.slots.iter().any(|s| s.pending > 0) {
            // The kernel may still read or write what the slots hold (guest memory their
            // buffers pin, bounce buffers, iovec arrays): leak it rather than free it.
            std::mem::forget(std::mem::take(&mut self.slots));
        }
    }
}

/// Room for a full queue of requests plus two watches; requests with several operations
/// (discard segments) submit early when it fills.
pub(super) fn ring_entries(depth: u16) -> u32 {
    (u32::from(depth) + 2).next_power_of_two().max(8)
}

fn misaligned(iovecs: &[libc::iovec], align: usize) -> bool {
    iovecs
        .iter()
        .any(|v| (v.iov_base as usize) % align != 0 || v.iov_len % align != 0)
}

#[cfg(test)]
#[path = "file_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "file_sync_tests.rs"]
mod sync_tests;
