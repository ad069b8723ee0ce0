//! Unit tests of the file engine on a real io_uring and a real file, with failures injected
//! into its ring (uring.rs `faults`): whatever fails, a request completes exactly once, only
//! after every operation of it that reached the ring has completed, and leaves nothing queued
//! that could complete (or be linked to) the next request of its slot. And bounce buffers stay
//! within their bounds (bounce.rs) whatever the length of a request.

use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::*;
use crate::disk::{DiskSpec, OpenOptions};
use crate::io::bounce::{CHUNK, KEEP};
use crate::io::Segment;
use crate::vhost_user::{test_memory, Generation, GuestMemoryHandle, RawBuffers};

const IMAGE: usize = 4 << 20;
/// Guest memory: one region of 8 MiB; the status byte at 0, data from 4 KiB on.
const STATUS: u64 = 0;
const DATA: u64 = 0x1000;

struct Setup {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    disk: Disk,
    memory: GuestMemoryHandle,
}

/// A 4 MiB image of a byte pattern, and guest memory.
fn setup() -> Setup {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("disk.img");
    let data: Vec<u8> = (0..IMAGE).map(|i| (i % 251) as u8 + 1).collect();
    std::fs::write(&path, &data).expect("write the image");
    let disk = Disk::open(&DiskSpec::Path(path.clone()), OpenOptions::default()).expect("open");
    Setup {
        _dir: dir,
        path,
        disk,
        memory: test_memory(&[(0, 8 << 20)]),
    }
}

impl Setup {
    /// An engine that sends every read and write to the ring.
    fn engine(&self) -> FileEngine {
        let mut engine = FileEngine::new(&self.disk, 4, false).expect("an engine");
        engine.start().expect("enable the ring");
        engine
    }

    fn generation(&self) -> Arc<Generation> {
        self.memory.current()
    }

    fn host(&self, gpa: u64) -> *mut u8 {
        self.generation()
            .memory()
            .get_host_address(GuestAddress(gpa))
            .expect("guest memory")
    }

    /// Buffers of `len` bytes at `gpa` (none when 0), with the status byte.
    fn buffers(&self, iovecs: &[(u64, usize)]) -> GuestBuffers {
        let mut raw = RawBuffers::default();
        raw.iovecs_mut()
            .extend(iovecs.iter().map(|&(gpa, len)| libc::iovec {
                iov_base: self.host(gpa).cast(),
                iov_len: len,
            }));
        let buffers = self
            .generation()
            .pin(raw, Some(self.host(STATUS).cast_const()));
        assert!(buffers.is_complete());
        buffers
    }

    fn image(&self) -> Vec<u8> {
        std::fs::read(&self.path).expect("read the image")
    }

    fn guest(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.generation()
            .memory()
            .read_slice(&mut out, GuestAddress(gpa))
            .expect("read guest memory");
        out
    }
}

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i % 251) as u8 + 1)
        .collect()
}

/// Enters and reaps until a request completes; it must be `tag`, and the only one.
fn wait(engine: &mut FileEngine, tag: Tag) -> Completion {
    let mut events = Vec::new();
    loop {
        engine.enter(true).expect("enter the ring");
        engine.reap(&mut events);
        let mut done: Vec<Completion> = events
            .drain(..)
            .filter_map(|event| match event {
                Event::Completed(done) => Some(done),
                Event::Watch { .. } => None,
            })
            .collect();
        if let Some(last) = done.pop() {
            assert!(done.is_empty(), "more than one completion");
            assert_eq!(last.tag, tag);
            return last;
        }
    }
}

/// Nothing of any request is left on the ring.
fn assert_idle(engine: &mut FileEngine) {
    assert!(engine
        .slots
        .iter()
        .all(|s| s.pending == 0 && s.buffers.is_none()));
    engine.enter(false).unwrap();
    let mut events = Vec::new();
    engine.reap(&mut events);
    assert!(events.is_empty(), "stale events: {events:?}");
}

fn errno(done: &Completion) -> Option<i32> {
    done.result.as_ref().err().and_then(|e| e.raw_os_error())
}

#[test]
fn a_discard_whose_later_push_fails_completes_after_its_queued_operations() {
    let s = setup();
    let mut engine = s.engine();
    engine.punch_hole = true;
    // Two of four ranges reach the ring; the third push fails.
    engine.ring.faults.fail_pushes_after = Some((2, libc::ENOMEM));
    let segments: Vec<Segment> = (0..4)
        .map(|i| Segment {
            offset: i * 64 * 1024,
            len: 4096,
            unmap: false,
        })
        .collect();
    let discard = Operation::Discard {
        segments: &segments,
        dsync: false,
    };
    let early = engine.submit(0, discard, s.buffers(&[]));
    assert!(
        early.is_none(),
        "completed while two of its operations are queued"
    );
    let done = wait(&mut engine, 0);
    assert_eq!(errno(&done), Some(libc::ENOMEM));
    let image = s.image();
    for (i, segment) in segments.iter().enumerate() {
        let at = segment.offset as usize;
        let zeroed = image[at..at + 4096].iter().all(|&b| b == 0);
        assert_eq!(zeroed, i < 2, "range {i}");
    }
    drop(done);
    // The slot serves its next request, and only that completes it.
    engine.ring.faults.fail_pushes_after = None;
    assert!(engine
        .submit(
            0,
            Operation::Read { offset: 8192 },
            s.buffers(&[(DATA, 4096)])
        )
        .is_none());
    let done = wait(&mut engine, 0);
    assert!(done.result.is_ok(), "{:?}", done.result);
    assert_eq!(s.guest(DATA, 4096), pattern(8192, 4096));
    drop(done);
    assert_idle(&mut engine);
}

#[test]
fn a_write_zeroes_pair_that_cannot_be_queued_leaves_nothing_queued() {
    let s = setup();
    let mut engine = s.engine();
    engine.punch_hole = true;
    engine.zeroes = ZeroesMethod::PunchThenAllocate;
    // The punch and the allocate it is linked to go in together or not at all: a punch left
    // alone on the ring would bind the next operation pushed (another request's) to itself.
    // Room for one entry: the punch would fit, the allocate not.
    engine.ring.faults.fail_pushes_after = Some((1, libc::ENOMEM));
    let segments = [Segment {
        offset: 0,
        len: 4096,
        unmap: false,
    }];
    let zeroes = Operation::WriteZeroes {
        segments: &segments,
        dsync: false,
    };
    let done = engine
        .submit(1, zeroes, s.buffers(&[]))
        .expect("nothing reached the ring: completed at once");
    assert_eq!(errno(&done), Some(libc::ENOMEM));
    assert_eq!(engine.ring.queued(), 0, "half a linked pair left queued");
    drop(done);
    assert_eq!(
        s.image()[..4096],
        pattern(0, 4096)[..],
        "nothing was zeroed"
    );
    assert_idle(&mut engine);
}

#[test]
fn a_read_whose_push_fails_is_not_left_in_flight() {
    let s = setup();
    let mut engine = s.engine();
    engine.ring.faults.fail_pushes_after = Some((0, libc::ENOMEM));
    let done = engine
        .submit(2, Operation::Read { offset: 0 }, s.buffers(&[(DATA, 4096)]))
        .expect("nothing reached the ring: completed at once");
    assert_eq!(errno(&done), Some(libc::ENOMEM));
    drop(done);
    assert_idle(&mut engine);
}

#[test]
fn a_short_read_whose_resubmission_fails_is_not_left_in_flight() {
    let s = setup();
    let mut engine = s.engine();
    // The image ends 4 KiB into this read: the first READV comes back short, and pushing the
    // rest fails.
    engine.ring.faults.fail_pushes_after = Some((1, libc::ENOMEM));
    let offset = (IMAGE - 4096) as u64;
    let early = engine.submit(3, Operation::Read { offset }, s.buffers(&[(DATA, 8192)]));
    assert!(early.is_none());
    let done = wait(&mut engine, 3);
    assert_eq!(errno(&done), Some(libc::ENOMEM));
    assert_eq!(s.guest(DATA, 4096), pattern(IMAGE - 4096, 4096));
    drop(done);
    assert_idle(&mut engine);
}

/// An engine that bounces misaligned buffers, as for O_DIRECT on a 4 KiB-block disk (the file
/// itself is buffered: the bounce is what is tested).
fn bouncing(s: &Setup) -> FileEngine {
    let mut engine = s.engine();
    engine.direct = true;
    engine.align = 4096;
    engine
}

#[test]
fn a_long_misaligned_read_bounces_in_bounded_pieces_and_gives_the_buffer_back() {
    let s = setup();
    let mut engine = bouncing(&s);
    // 3.5 MiB into a buffer 512 bytes off a page: more than three pieces.
    let len = (7 << 20) / 2;
    let offset = 4096;
    guest_fill(&s, DATA + 512, len, 0xee);
    let early = engine.submit(
        0,
        Operation::Read { offset },
        s.buffers(&[(DATA + 512, len)]),
    );
    assert!(early.is_none());
    let held = engine.slots[0].bounce.as_ref().map_or(0, |b| b.len());
    assert!(
        held <= CHUNK,
        "a {len}-byte request holds a {held}-byte bounce buffer"
    );
    let done = wait(&mut engine, 0);
    assert!(done.result.is_ok(), "{:?}", done.result);
    assert_eq!(
        s.guest(DATA + 512, len),
        pattern(offset as usize, len),
        "data"
    );
    drop(done);
    assert!(
        engine.slots[0].bounce.is_none(),
        "a large bounce buffer outlives its request"
    );
    assert_idle(&mut engine);
}

#[test]
fn a_long_misaligned_write_bounces_in_bounded_pieces() {
    let s = setup();
    let mut engine = bouncing(&s);
    let len = (5 << 20) / 2;
    let offset = 1 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i % 13) as u8).collect();
    s.generation()
        .memory()
        .write_slice(&data, GuestAddress(DATA + 8))
        .unwrap();
    let early = engine.submit(
        1,
        Operation::Write {
            offset,
            dsync: false,
        },
        s.buffers(&[(DATA + 8, len)]),
    );
    assert!(early.is_none());
    assert!(engine.slots[1]
        .bounce
        .as_ref()
        .is_some_and(|b| b.len() <= CHUNK));
    let done = wait(&mut engine, 1);
    assert!(done.result.is_ok(), "{:?}", done.result);
    drop(done);
    let image = s.image();
    assert_eq!(image[offset as usize..offset as usize + len], data[..]);
    assert_eq!(image[..offset as usize], pattern(0, offset as usize)[..]);
    assert!(engine.slots[1].bounce.is_none());
}

#[test]
fn a_short_misaligned_request_keeps_its_bounce_buffer_for_the_next() {
    let s = setup();
    let mut engine = bouncing(&s);
    for round in 0..2 {
        let offset = 8192 * (round + 1);
        let early = engine.submit(
            2,
            Operation::Read { offset },
            s.buffers(&[(DATA + 512, 4096), (DATA + 8192, 4096)]),
        );
        assert!(early.is_none());
        let done = wait(&mut engine, 2);
        assert!(done.result.is_ok(), "{:?}", done.result);
        drop(done);
        assert_eq!(s.guest(DATA + 512, 4096), pattern(offset as usize, 4096));
        assert_eq!(
            s.guest(DATA + 8192, 4096),
            pattern(offset as usize + 4096, 4096)
        );
        assert!(
            engine.slots[2]
                .bounce
                .as_ref()
                .is_some_and(|b| b.len() <= KEEP),
            "a small buffer is kept (round {round})"
        );
    }
}

fn guest_fill(s: &Setup, gpa: u64, len: usize, byte: u8) {
    s.generation()
        .memory()
        .write_slice(&vec![byte; len], GuestAddress(gpa))
        .unwrap();
}
