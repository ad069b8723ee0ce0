//! A queue thread's io_uring: the backing file registered as fixed file 0, helpers that build
//! the operations virtio-blk needs, one-shot reads of eventfds (watches), and submission that
//! never loses an entry when the submission queue is full.
//!
//! Callers pass raw pointers (iovec arrays, guest buffers); every `push` is `unsafe` because
//! the kernel uses them until the matching completion is reaped. Watches read into a sink the
//! ring owns, which it leaks rather than frees while one may still be pending.
//!
//! A full submission queue is submitted to make room. When the kernel refuses that with EBUSY
//! (its completion queue overflowed: it takes no submissions until completions are reaped), the
//! completions waiting are moved to a backlog the ring hands out first at the next
//! [`Ring::completions`], and the submission is retried: nothing is lost, and a queue thread
//! pushing a request's operations never spins on a ring only it could drain.

use std::cell::UnsafeCell;
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::RawFd;

use io_uring::{opcode, squeue, types, IoUring};

pub use io_uring::cqueue::Entry as Completion;

/// fallocate modes (linux/falloc.h).
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
pub const ALLOCATE: i32 = libc::FALLOC_FL_KEEP_SIZE;

/// The fixed-file slot of the backing.
const BACKING: types::Fixed = types::Fixed(0);

/// user_data of watches (the token in the low 32 bits) and of cancel requests. Operations carry
/// the caller's user_data, which must be below both.
const WATCH: u64 = 1 << 62;
const CANCEL: u64 = 1 << 63;

/// What a completion was for (see [`Ring::classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reaped {
    /// An operation, with the caller's user_data and the result.
    Op(u64, i32),
    /// A watch, with its token and the read's result.
    Watch(u32, i32),
    /// A cancel request.
    Cancel,
}

pub struct Ring {
    ring: IoUring,
    has_backing: bool,
    disabled: bool,
    /// Where watches read to; nothing reads it back.
    sink: ManuallyDrop<Box<UnsafeCell<u64>>>,
    /// Watches pushed whose completion has not been reaped (see [`Ring::classify`]).
    watching: usize,
    /// Completions taken off the completion queue to make room (see the module comment), not
    /// yet handed out.
    backlog: Vec<Completion>,
    #[cfg(test)]
    pub(super) faults: faults::Faults,
}

impl Ring {
    /// A ring with room for `entries` submissions, with `backing` registered when given.
    /// It is created disabled, so it can be set up on one thread (where a failure can still be
    /// reported to the frontend) and used on another: the thread that calls [`Ring::enable`]
    /// becomes its only submitter.
    pub fn new(entries: u32, backing: Option<RawFd>) -> io::Result<Ring> {
        // Only the queue thread submits: let the kernel skip the locking, and run task work when
        // we enter the ring rather than interrupting us, flagging that it is pending so a
        // polling thread knows to enter. Older kernels lack the flags.
        let (ring, disabled) = match IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled()
            .build(entries)
        {
            Ok(ring) => (ring, true),
            Err(_) => (IoUring::new(entries)?, false),
        };
        if let Some(fd) = backing {
            ring.submitter().register_files(&[fd])?;
        }
        Ok(Ring {
            ring,
            has_backing: backing.is_some(),
            disabled,
            sink: ManuallyDrop::new(Box::new(UnsafeCell::new(0))),
            watching: 0,
            backlog: Vec::new(),
            #[cfg(test)]
            faults: faults::Faults::default(),
        })
    }

    /// Makes the calling thread the ring's submitter.
    pub fn enable(&mut self) -> io::Result<()> {
        if std::mem::take(&mut self.disabled) {
            self.ring.submitter().register_enable_rings()?;
        }
        Ok(())
    }

    /// Queues one entry, submitting what is queued first if the submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid until its completion is reaped.
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: forwarded to the caller.
        unsafe { self.push_all(std::slice::from_ref(entry)) }
    }

    /// Queues `entries` together, or none of them: a linked chain must not be split by a failure
    /// (its last link would bind whatever is pushed next) nor by a submission between its
    /// entries. Submits what is queued first if there is no room for all of them.
    ///
    /// # Safety
    /// Every buffer the entries point to must stay valid until their completions are reaped.
    pub unsafe fn push_all(&mut self, entries: &[squeue::Entry]) -> io::Result<()> {
        #[cfg(test)]
        self.faults.before_push(entries.len())?;
        loop {
            // SAFETY: forwarded to the caller.
            if unsafe { self.ring.submission().push_multiple(entries) }.is_ok() {
                return Ok(());
            }
            if entries.len() > self.ring.params().sq_entries() as usize {
                return Err(io::Error::from_raw_os_error(libc::E2BIG));
            }
            match self.enter(0) {
                Ok(_) => {}
                // The completion queue overflowed: make room in it, then try again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    self.backlog.extend(self.ring.completion());
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// io_uring_enter: submits what is queued and waits for `want` completions, EINTR retried.
    fn enter(&mut self, want: usize) -> io::Result<usize> {
        // Completions in the backlog are ready: do not sleep waiting for more.
        let want = if self.backlog.is_empty() { want } else { 0 };
        loop {
            #[cfg(test)]
            self.faults
                .before_enter(!self.ring.completion().is_empty())?;
            match self.ring.submitter().submit_and_wait(want) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                other => return other,
            }
        }
    }

    /// Submits what is queued and waits for at least `want` completions.
    pub fn submit(&mut self, want: usize) -> io::Result<usize> {
        match self.enter(want) {
            // The completion queue is full: the caller must reap before submitting more.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(0),
            other => other,
        }
    }

    /// Like [`Ring::submit`], but gives up waiting after `timeout`: `Ok(false)` then.
    pub fn submit_timeout(
        &mut self,
        want: usize,
        timeout: std::time::Duration,
    ) -> io::Result<bool> {
        if !self.backlog.is_empty() {
            return self.submit(0).map(|_| true);
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        loop {
            match self.ring.submitter().submit_with_args(want, &args) {
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(true),
                Err(e) => return Err(e),
                Ok(_) => return Ok(true),
            }
        }
    }

    /// Entries queued and not yet submitted.
    #[cfg(test)]
    pub fn queued(&mut self) -> usize {
        self.ring.submission().len()
    }

    /// Whether completions are ready, or task work that produces them is pending (then
    /// [`Ring::submit`] runs it). Costs no system call.
    pub fn has_events(&mut self) -> bool {
        !self.backlog.is_empty()
            || !self.ring.completion().is_empty()
            || self.ring.submission().taskrun()
    }

    /// Takes the completions that are ready, the backlog's first.
    pub fn completions(&mut self, out: &mut Vec<Completion>) {
        out.clear();
        out.append(&mut self.backlog);
        out.extend(self.ring.completion());
    }

    fn backing(&self) -> types::Fixed {
        debug_assert!(self.has_backing, "I/O on a ring without a backing file");
        BACKING
    }

    pub fn readv(
        &self,
        iov: *const libc::iovec,
        count: u32,
        offset: u64,
        user_data: u64,
    ) -> squeue::Entry {
        opcode::Readv::new(self.backing(), iov, count)
            .offset(offset)
            .build()
            .user_data(user_data)
    }

    pub fn writev(
        &self,
        iov: *const libc::iovec,
        count: u32,
        offset: u64,
        dsync: bool,
        user_data: u64,
    ) -> squeue::Entry {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        opcode::Writev::new(self.backing(), iov, count)
            .offset(offset)
            .rw_flags(flags)
            .build()
            .user_data(user_data)
    }

    pub fn fdatasync(&self, user_data: u64) -> squeue::Entry {
        opcode::Fsync::new(self.backing())
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data)
    }

    pub fn fallocate(&self, mode: i32, offset: u64, len: u64, user_data: u64) -> squeue::Entry {
        opcode::Fallocate::new(self.backing(), len)
            .offset(offset)
            .mode(mode)
            .build()
            .user_data(user_data)
    }

    /// Queues a one-shot read of `len` bytes (at most 8) from `fd` into the ring's sink; its
    /// completion is [`Reaped::Watch`] with `token`.
    pub fn watch(&mut self, fd: RawFd, len: u32, token: u32) -> io::Result<()> {
        let entry = opcode::Read::new(types::Fd(fd), self.sink.get().cast(), len.min(8))
            .build()
            .user_data(WATCH | u64::from(token));
        // SAFETY: the sink is 8 bytes on the heap, owned by the ring and never read; the ring
        // frees it only when no watch is outstanding (Drop), and leaks it otherwise.
        unsafe { self.push(&entry) }?;
        self.watching += 1;
        Ok(())
    }

    /// Cancels the watch `token` (it completes with -ECANCELED if still pending).
    pub fn unwatch(&mut self, token: u32) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(WATCH | u64::from(token))
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancel request points at no memory.
        unsafe { self.push(&entry) }
    }

    /// Cancels every pending operation with `user_data` (Linux 5.19+); they complete with
    /// -ECANCELED.
    pub fn cancel_ops(&mut self, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::user_data(user_data).all())
            .build()
            .user_data(CANCEL);
        // SAFETY: a cancel request points at no memory.
        unsafe { self.push(&entry) }
    }

    /// What `cqe` was for; a watch's completion counts as reaped.
    pub fn classify(&mut self, cqe: &Completion) -> Reaped {
        match cqe.user_data() {
            CANCEL => Reaped::Cancel,
            watch if watch & WATCH != 0 => {
                self.watching = self.watching.saturating_sub(1);
                Reaped::Watch((watch & !WATCH) as u32, cqe.result())
            }
            user_data => Reaped::Op(user_data, cqe.result()),
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.watching == 0 {
            // SAFETY: no read into the sink is outstanding, and it is not used again.
            unsafe { ManuallyDrop::drop(&mut self.sink) };
        }
        // Otherwise the kernel may still write the sink: leave it allocated.
    }
}

/// Links `entry` to the next one: the next starts only if this one succeeds. Push the two with
/// one [`Ring::push_all`].
pub fn linked(entry: squeue::Entry) -> squeue::Entry {
    entry.flags(squeue::Flags::IO_LINK)
}

/// Failures a test can make a ring have.
#[cfg(test)]
pub(super) mod faults {
    use std::io;

    #[derive(Debug, Default)]
    pub struct Faults {
        /// Entries that may be pushed: a push that would go beyond fails with the errno.
        pub fail_pushes_after: Option<(usize, i32)>,
        /// io_uring_enter fails with EBUSY while completions wait in the completion queue, as a
        /// kernel whose completion queue overflowed does.
        pub busy_until_reaped: bool,
        /// EBUSYs returned so far; past a thousand, the ring gives up with ELOOP, so a caller
        /// that retries without reaping fails the test instead of hanging it.
        pub busy: usize,
        pushes: usize,
    }

    impl Faults {
        pub fn before_push(&mut self, entries: usize) -> io::Result<()> {
            match self.fail_pushes_after {
                Some((after, errno)) if self.pushes + entries > after => {
                    Err(io::Error::from_raw_os_error(errno))
                }
                _ => {
                    self.pushes += entries;
                    Ok(())
                }
            }
        }

        pub fn before_enter(&mut self, completions_waiting: bool) -> io::Result<()> {
            if !(self.busy_until_reaped && completions_waiting) {
                return Ok(());
            }
            self.busy += 1;
            let errno = if self.busy > 1000 {
                libc::ELOOP
            } else {
                libc::EBUSY
            };
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nop(user_data: u64) -> squeue::Entry {
        opcode::Nop::new().build().user_data(user_data)
    }

    fn push(ring: &mut Ring, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: a NOP points at no memory.
        unsafe { ring.push(entry) }
    }

    #[test]
    fn a_full_submission_queue_with_an_overflowed_completion_queue_is_drained_not_spun_on() {
        let mut ring = Ring::new(8, None).expect("an io_uring");
        ring.enable().unwrap();
        let sq = ring.ring.params().sq_entries() as u64;
        // A submission queue's worth of completions waiting in the completion queue...
        for i in 0..sq {
            push(&mut ring, &nop(i)).unwrap();
        }
        ring.submit(0).unwrap();
        // ...and a kernel that takes no submission until they are reaped.
        ring.faults.busy_until_reaped = true;
        for i in sq..3 * sq {
            push(&mut ring, &nop(i)).expect("room is made by reaping, not by spinning");
        }
        assert!(ring.faults.busy > 0, "the test never made the kernel busy");
        assert!(ring.has_events(), "the reaped completions are still events");
        ring.faults.busy_until_reaped = false;
        let mut seen = Vec::new();
        let mut out = Vec::new();
        while seen.len() < 3 * sq as usize {
            ring.submit(1).unwrap();
            ring.completions(&mut out);
            seen.extend(out.iter().map(|c| c.user_data()));
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..3 * sq).collect::<Vec<_>>(),
            "every completion, once"
        );
    }

    #[test]
    fn entries_pushed_together_are_never_split() {
        let mut ring = Ring::new(8, None).expect("an io_uring");
        ring.enable().unwrap();
        let sq = ring.ring.params().sq_entries() as u64;
        for i in 0..sq - 1 {
            push(&mut ring, &nop(i)).unwrap();
        }
        // One free entry: a linked pair waits for a submission and goes in whole.
        let pair = [linked(nop(100)), nop(101)];
        // SAFETY: NOPs point at no memory.
        unsafe { ring.push_all(&pair) }.unwrap();
        assert_eq!(ring.ring.submission().len(), 2, "the pair, alone and whole");
        // A pair that fails to push leaves nothing behind to link to the next entry.
        ring.faults.fail_pushes_after = Some((0, libc::ENOMEM));
        // SAFETY: as above.
        assert!(unsafe { ring.push_all(&pair) }.is_err());
        assert_eq!(ring.ring.submission().len(), 2);
    }
}
