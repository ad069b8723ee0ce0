//! Unit tests of the file engine's durability on a real file (ext4 or whatever the temp dir
//! is on) and a real io_uring: what a write-through or write-back discard and write-zeroes
//! queue on the ring, and what they do to the file.

use std::io::Write;
use std::os::unix::fs::FileExt;

use io_uring::opcode;

use super::*;
use crate::disk::{DiskSpec, OpenOptions};
use crate::io::Segment;
use crate::vhost_user::{test_memory, RawBuffers};

const MIB: u64 = 1 << 20;
const FALLOCATE: u8 = opcode::Fallocate::CODE;
const FSYNC: u8 = opcode::Fsync::CODE;

struct Bed {
    engine: FileEngine,
    file: tempfile::NamedTempFile,
    memory: crate::vhost_user::GuestMemoryHandle,
    _disk: Disk,
}

/// A 1 MiB file of 0xaa bytes, served by a file engine with every read and write through its
/// ring.
fn bed() -> Bed {
    let mut file = tempfile::NamedTempFile::new().expect("a temp file");
    file.write_all(&vec![0xaa; MIB as usize]).unwrap();
    file.flush().unwrap();
    let disk = Disk::open(
        &DiskSpec::Path(file.path().to_path_buf()),
        OpenOptions::default(),
    )
    .expect("open the disk");
    let mut engine = FileEngine::new(&disk, 8, false).expect("a file engine");
    engine.start().expect("enable the ring");
    Bed {
        engine,
        file,
        memory: test_memory(&[(0, MIB)]),
        _disk: disk,
    }
}

impl Bed {
    /// Submits `operation` (with no data buffers) and waits for its completion.
    fn run(&mut self, operation: Operation<'_>) -> io::Result<()> {
        let buffers = self.memory.current().pin(RawBuffers::default(), None);
        if let Some(done) = self.engine.submit(3, operation, buffers) {
            return done.result;
        }
        let mut events = Vec::new();
        loop {
            self.engine.enter(true).expect("enter the ring");
            self.engine.reap(&mut events);
            for event in events.drain(..) {
                if let Event::Completed(done) = event {
                    assert_eq!(done.tag, 3);
                    return done.result;
                }
            }
        }
    }

    /// Takes what was queued on the ring so far.
    fn queued(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.engine.queued)
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.file.as_file().read_exact_at(&mut buf, offset).unwrap();
        buf
    }
}

fn segments(unmap: bool) -> [Segment; 2] {
    [
        Segment {
            offset: 0,
            len: 4096,
            unmap,
        },
        Segment {
            offset: 64 * 1024,
            len: 8192,
            unmap,
        },
    ]
}

#[test]
fn write_through_discard_and_write_zeroes_are_synced_after_their_ranges() {
    let mut bed = bed();
    let ranges = segments(false);
    bed.run(Operation::WriteZeroes {
        segments: &ranges,
        dsync: true,
    })
    .unwrap();
    let queued = bed.queued();
    assert_eq!(queued.last(), Some(&FSYNC), "{queued:?}");
    assert!(
        queued[..queued.len() - 1].iter().all(|&op| op == FALLOCATE) && queued.len() >= 3,
        "{queued:?}"
    );
    assert_eq!(bed.bytes(0, 4096), vec![0; 4096]);
    assert_eq!(bed.bytes(64 * 1024, 8192), vec![0; 8192]);
    assert_eq!(
        bed.bytes(4096, 4096),
        vec![0xaa; 4096],
        "between the ranges"
    );

    bed.run(Operation::Discard {
        segments: &ranges,
        dsync: true,
    })
    .unwrap();
    assert_eq!(bed.queued(), [FALLOCATE, FALLOCATE, FSYNC]);
}

#[test]
fn write_back_discard_and_write_zeroes_are_not_synced() {
    let mut bed = bed();
    let ranges = segments(true);
    bed.run(Operation::WriteZeroes {
        segments: &ranges,
        dsync: false,
    })
    .unwrap();
    let queued = bed.queued();
    assert!(
        !queued.is_empty() && queued.iter().all(|&op| op == FALLOCATE),
        "{queued:?}"
    );
    assert_eq!(bed.bytes(0, 4096), vec![0; 4096]);
    bed.run(Operation::Discard {
        segments: &ranges,
        dsync: false,
    })
    .unwrap();
    assert_eq!(bed.queued(), [FALLOCATE, FALLOCATE]);
}

#[test]
fn a_failed_range_is_not_synced_and_fails_the_request() {
    let mut bed = bed();
    // A negative length (as the kernel reads it) fails the fallocate with EINVAL.
    let bad = [Segment {
        offset: 0,
        len: u64::MAX,
        unmap: false,
    }];
    let result = bed.run(Operation::Discard {
        segments: &bad,
        dsync: true,
    });
    assert!(result.is_err());
    assert_eq!(bed.queued(), [FALLOCATE], "no sync after a failure");
}
