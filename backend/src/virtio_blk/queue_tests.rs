//! Unit tests of the queue loop against a fake engine: chains are written into real guest
//! memory (installed as a vhost-user memory table would be), taken from a real split queue, and
//! the loop's steps (`process_avail`, `reap`) are driven by hand. The fake engine records what
//! it was asked, holds the buffers until the test completes them, or fails the test the moment
//! anything reaches it: hostile chains must be answered before any I/O.
//!
//! ```text
//!   0x0000_0000  descriptor table   0x0000_0400  avail ring   0x0000_0800  used ring
//!   0x0000_1000  headers, status bytes, data ...          (low region, 1 MiB)
//!   0x4000_0000  data in the high region                  (high region, 1 MiB)
//!   0x8000_0000  nothing there
//! ```

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::disk::{Disk, DiskSpec, OpenOptions};
use crate::io::{Publication, Publisher, Segment};
use crate::vhost_user::{test_memory, CallFd, DirtyLog, GuestMemoryHandle, LogMap, QueueControl};
use crate::virtio_blk::DeviceOptions;

const QUEUE_SIZE: u16 = 64;
const DESC: u64 = 0;
const AVAIL: u64 = 0x400;
const USED: u64 = 0x800;
const LOW: (u64, u64) = (0, 1 << 20);
const HIGH: (u64, u64) = (1 << 30, 1 << 20);
const OUTSIDE: u64 = 1 << 31;
/// The null disk's capacity: 2048 sectors.
const CAPACITY: u64 = 1 << 20;
const SERIAL: &str = "queue-test-serial";

const T_IN: u32 = spec::VIRTIO_BLK_T_IN;
const T_OUT: u32 = spec::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = spec::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = spec::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = spec::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = spec::VIRTIO_BLK_T_WRITE_ZEROES;
const UNSUPP: u8 = spec::VIRTIO_BLK_S_UNSUPP as u8;
/// What the tests put in status bytes, to see whether they were written.
const UNTOUCHED: u8 = 0xee;

/// An operation as the fake engine saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Op {
    Read { offset: u64, len: u64 },
    Write { offset: u64, len: u64, dsync: bool },
    Flush,
    Discard(Vec<Segment>, bool),
    WriteZeroes(Vec<Segment>, bool),
}

#[derive(Default)]
struct Fake {
    /// Fail the test at the first submission.
    refuse: bool,
    /// Complete every request at once, successfully (as the null disk does).
    at_once: bool,
    /// Fail every request at once, as an engine whose ring refuses the request's operations.
    fail_at_once: bool,
    submitted: Vec<(Tag, Op)>,
    /// Requests in flight, with their buffers.
    held: Vec<(Tag, GuestBuffers)>,
    /// Events the next reap returns.
    ready: Vec<Event>,
    /// Requests a cancellation picked.
    cancelled: Vec<Tag>,
    /// Say that the queue thread must not poll (as librbd's engine does).
    no_polling: bool,
    /// Take the queue loop's offer of direct completion (as librbd's engine does).
    direct: bool,
    /// What the queue loop offered.
    publisher: Option<Arc<dyn Publisher>>,
}

struct FakeEngine(Arc<Mutex<Fake>>);

impl Engine for FakeEngine {
    fn start(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn submit(
        &mut self,
        tag: Tag,
        operation: Operation<'_>,
        buffers: GuestBuffers,
    ) -> Option<Completion> {
        let mut fake = self.0.lock().unwrap();
        let len = buffers.len();
        let op = match operation {
            Operation::Read { offset } => Op::Read { offset, len },
            Operation::Write { offset, dsync } => Op::Write { offset, len, dsync },
            Operation::Flush => Op::Flush,
            Operation::Discard { segments, dsync } => Op::Discard(segments.to_vec(), dsync),
            Operation::WriteZeroes { segments, dsync } => Op::WriteZeroes(segments.to_vec(), dsync),
        };
        assert!(
            !fake.refuse,
            "the engine got request {tag} ({op:?}): validation must come first"
        );
        fake.submitted.push((tag, op));
        if fake.at_once {
            return Some(Completion::new(tag, Ok(()), buffers));
        }
        if fake.fail_at_once {
            let error = io::Error::from_raw_os_error(libc::ENOMEM);
            return Some(Completion::new(tag, Err(error), buffers));
        }
        fake.held.push((tag, buffers));
        None
    }

    fn cancel(&mut self, which: &dyn Fn(&GuestBuffers) -> bool) -> io::Result<()> {
        let mut fake = self.0.lock().unwrap();
        let picked: Vec<Tag> = fake
            .held
            .iter()
            .filter(|(_, buffers)| which(buffers))
            .map(|(tag, _)| *tag)
            .collect();
        fake.cancelled.extend(picked);
        Ok(())
    }

    fn watch(&mut self, _fd: std::os::fd::RawFd, _len: u32, _token: u32) -> io::Result<()> {
        Ok(())
    }

    fn unwatch(&mut self, _token: u32) -> io::Result<()> {
        Ok(())
    }

    fn enter(&mut self, _wait: bool) -> io::Result<()> {
        Ok(())
    }

    fn enter_timeout(&mut self, _timeout: Duration) -> io::Result<bool> {
        Ok(true)
    }

    fn has_events(&mut self) -> bool {
        !self.0.lock().unwrap().ready.is_empty()
    }

    fn reap(&mut self, events: &mut Vec<Event>) {
        events.append(&mut self.0.lock().unwrap().ready);
    }

    fn may_poll(&self) -> bool {
        !self.0.lock().unwrap().no_polling
    }

    fn publish_with(&mut self, publisher: Arc<dyn Publisher>) -> bool {
        let mut fake = self.0.lock().unwrap();
        fake.publisher = Some(publisher);
        fake.direct
    }
}

/// One descriptor of a chain.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    writable: bool,
}

fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        writable: false,
    }
}

fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        writable: true,
    }
}

/// A chain as the test posted it.
struct Posted {
    head: u16,
    status: u64,
}

struct Harness {
    memory: GuestMemoryHandle,
    server: QueueServer<FakeEngine>,
    fake: Arc<Mutex<Fake>>,
    control: Arc<QueueControl>,
    next_desc: u16,
    /// Bump allocators in the low and high regions.
    low: u64,
    high: u64,
}

impl Harness {
    fn new(fake: Fake) -> Harness {
        Harness::polling(fake, Duration::ZERO)
    }

    /// With `--poll-max-us` at `poll_max`.
    fn polling(fake: Fake, poll_max: Duration) -> Harness {
        let memory = test_memory(&[LOW, HIGH]);
        let queue = split_queue(QUEUE_SIZE, DESC, AVAIL, USED);
        let control = Arc::new(QueueControl::new(true).expect("an eventfd"));
        let q = RunningQueue {
            index: 0,
            queue,
            kick: EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
            call: Arc::new(CallFd::default()),
            err: Arc::new(CallFd::default()),
            control: control.clone(),
            memory: memory.clone(),
            log: DirtyLog::default(),
            inflight: None,
            resubmit: Vec::new(),
        };
        let disk = Disk::open(&DiskSpec::Null { size: CAPACITY }, OpenOptions::default())
            .expect("a null disk");
        let options = DeviceOptions {
            num_queues: 1,
            max_queue_size: QUEUE_SIZE,
            blk_size: 512,
            serial: Some(SERIAL.to_string()),
            write_cache: false,
        };
        let device = Arc::new(BlockDevice::new(disk, &options).with_poll_max(poll_max));
        let fake = Arc::new(Mutex::new(fake));
        let engine = FakeEngine(fake.clone());
        Harness {
            server: QueueServer::with_engine(device, q, engine),
            memory,
            fake,
            control,
            next_desc: 0,
            low: 0x1000,
            high: HIGH.0,
        }
    }

    fn mem(&self) -> Arc<Generation> {
        self.memory.current()
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem()
            .memory()
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest memory");
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.mem()
            .memory()
            .read_slice(&mut out, GuestAddress(addr))
            .expect("read guest memory");
        out
    }

    fn alloc_low(&mut self, len: u64) -> u64 {
        let at = self.low;
        self.low += len.next_multiple_of(64);
        at
    }

    fn alloc_high(&mut self, len: u64) -> u64 {
        let at = self.high;
        self.high += len.next_multiple_of(64);
        at
    }

    /// A request header of `ty` at `sector`, in the low region.
    fn header(&mut self, ty: u32, sector: u64) -> u64 {
        let at = self.alloc_low(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&ty.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.write(at, &h);
        at
    }

    /// A status byte in the low region, preset to UNTOUCHED.
    fn status(&mut self) -> u64 {
        let at = self.alloc_low(1);
        self.write(at, &[UNTOUCHED]);
        at
    }

    /// Discard / write-zeroes segments, in the low region.
    fn segments(&mut self, segments: &[(u64, u32, u32)]) -> (u64, u32) {
        let at = self.alloc_low(16 * segments.len() as u64);
        for (i, &(sector, sectors, flags)) in segments.iter().enumerate() {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&sectors.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            self.write(at + 16 * i as u64, &s);
        }
        (at, 16 * segments.len() as u32)
    }

    /// Makes `descs` available as one chain; `status` is where its status byte is.
    fn post(&mut self, descs: &[D], status: u64) -> Posted {
        let mem = self.mem();
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = head + i as u16;
            let last = i + 1 == descs.len();
            let mut flags = if d.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let raw = RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, index + 1));
            mem.memory()
                .write_obj(raw, GuestAddress(DESC + 16 * u64::from(index)))
                .expect("write a descriptor");
        }
        self.next_desc += descs.len() as u16;
        assert!(
            self.next_desc <= QUEUE_SIZE,
            "the test ran out of descriptors"
        );
        let idx: u16 = mem.memory().read_obj(GuestAddress(AVAIL + 2)).unwrap();
        let slot = AVAIL + 4 + 2 * u64::from(idx % QUEUE_SIZE);
        mem.memory().write_obj(head, GuestAddress(slot)).unwrap();
        mem.memory()
            .write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
        Posted { head, status }
    }

    /// A read of `len` bytes at `sector` into a buffer at `data`.
    fn post_read(&mut self, sector: u64, data: u64, len: u32) -> Posted {
        let header = self.header(T_IN, sector);
        let status = self.status();
        self.post(&[r(header, 16), w(data, len), w(status, 1)], status)
    }

    /// The used ring: (head, length) of every entry so far.
    fn used(&self) -> Vec<(u32, u32)> {
        let mem = self.mem();
        let mem: &GuestMemoryMmap = mem.memory();
        let idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        (0..idx)
            .map(|i| {
                let at = USED + 4 + 8 * u64::from(i % QUEUE_SIZE);
                let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect()
    }

    fn status_of(&self, posted: &Posted) -> u8 {
        self.read(posted.status, 1)[0]
    }

    /// Completes the held request `tag`, after copying `data` into its buffers, and lets the
    /// loop reap it.
    fn complete(&mut self, tag: Tag, result: io::Result<()>, data: &[u8]) {
        {
            let mut fake = self.fake.lock().unwrap();
            let at = fake
                .held
                .iter()
                .position(|(t, _)| *t == tag)
                .expect("the request is held");
            let (_, mut buffers) = fake.held.remove(at);
            buffers.copy_in(data);
            fake.ready
                .push(Event::Completed(Completion::new(tag, result, buffers)));
        }
        self.server.reap().expect("reap");
    }

    fn region_pins_in_use(&self) -> Vec<usize> {
        self.mem().pins().iter().map(|p| p.in_flight()).collect()
    }
}

/// A ready split queue of `size` at these guest addresses. (virtio-queue's mock lays the used
/// ring over the end of the avail ring, so the tests place the rings themselves.)
fn split_queue(size: u16, desc: u64, avail: u64, used: u64) -> Queue {
    let mut queue = Queue::new(size).expect("a queue size");
    queue.set_size(size);
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_ready(true);
    queue
}

fn refusing() -> Fake {
    Fake {
        refuse: true,
        ..Fake::default()
    }
}

fn holding() -> Fake {
    Fake::default()
}

fn at_once() -> Fake {
    Fake {
        at_once: true,
        ..Fake::default()
    }
}

/// The latency clock is read once per batch of completions: a request completed in a later
/// batch than another taken with it gets its own end time, not the earlier batch's (which
/// would count it as taking no time at all).
#[test]
fn each_batch_of_completions_reads_the_clock_again() {
    let mut h = Harness::new(holding());
    let data = h.alloc_low(4096);
    // Two requests taken in one pass; the second is completed 30 ms after the first.
    h.server.pass_start = Instant::now();
    h.post_read(0, data, 512);
    h.post_read(8, data + 512, 512);
    h.server.process_avail();
    let tags: Vec<Tag> = h
        .fake
        .lock()
        .unwrap()
        .held
        .iter()
        .map(|(t, _)| *t)
        .collect();
    h.complete(tags[0], Ok(()), &[0; 512]);
    std::thread::sleep(Duration::from_millis(30));
    h.complete(tags[1], Ok(()), &[0; 512]);
    let latency = h.server.device.totals().latency;
    // 25 ms < 30 ms <= 50 ms: the bucket after the 25 ms bound.
    let bucket = crate::virtio_blk::stats::LATENCY_BOUNDS_US
        .iter()
        .position(|&us| us == 25_000)
        .unwrap()
        + 1;
    assert_eq!(latency.iter().sum::<u64>(), 2, "{latency:?}");
    assert_eq!(
        latency[bucket..].iter().sum::<u64>(),
        1,
        "the later request was not counted at 30 ms or more: {latency:?}"
    );
}

#[test]
fn hostile_chains_are_answered_before_any_io() {
    let mut h = Harness::new(refusing());
    let data = h.alloc_low(4096);
    // A header of 8 bytes.
    let short = h.header(T_IN, 0);
    let status = h.status();
    let short_header = h.post(&[r(short, 8), w(data, 512), w(status, 1)], status);
    // A read past the end of the disk.
    let past_end = h.post_read(CAPACITY / 512, data, 512);
    // A read across the end.
    let across = h.post_read(CAPACITY / 512 - 1, data, 1024);
    // A device-readable descriptor after a writable one.
    let header = h.header(T_IN, 0);
    let status = h.status();
    let order = h.post(
        &[r(header, 16), w(data, 512), r(data, 512), w(status, 1)],
        status,
    );
    // A request type nobody knows.
    let header = h.header(99, 0);
    let status = h.status();
    let unknown = h.post(&[r(header, 16), w(status, 1)], status);
    // A write from outside guest memory.
    let header = h.header(T_OUT, 0);
    let status = h.status();
    let outside = h.post(&[r(header, 16), r(OUTSIDE, 512), w(status, 1)], status);
    // Half a sector.
    let partial = h.post_read(0, data, 256);
    // A write-zeroes segment with flags the spec does not define.
    let header = h.header(T_WRITE_ZEROES, 0);
    let (segs, segs_len) = h.segments(&[(0, 8, 0x80)]);
    let status = h.status();
    let flags = h.post(&[r(header, 16), r(segs, segs_len), w(status, 1)], status);
    // No status byte at all: the last descriptor is device-readable.
    let header = h.header(T_IN, 0);
    let no_status = h.post(&[r(header, 16), r(data, 512)], data);

    h.server.process_avail();

    let ioerr = [short_header, past_end, across, order, outside, partial];
    for posted in &ioerr {
        assert_eq!(h.status_of(posted), STATUS_IOERR, "head {}", posted.head);
    }
    assert_eq!(h.status_of(&unknown), UNSUPP);
    assert_eq!(h.status_of(&flags), UNSUPP);
    let mut expected: Vec<(u32, u32)> = ioerr
        .iter()
        .chain([&unknown, &flags])
        .map(|p| (u32::from(p.head), 1))
        .collect();
    expected.push((u32::from(no_status.head), 0));
    expected.sort_unstable();
    let mut used = h.used();
    used.sort_unstable();
    assert_eq!(
        used, expected,
        "every chain returned; no status byte: length 0"
    );
    assert_eq!(h.region_pins_in_use(), [0, 0], "nothing stays pinned");
    assert_eq!(h.server.in_flight, 0);
    assert_eq!(h.server.device.totals().errors, 9);
}

#[test]
fn get_id_is_answered_by_the_queue_loop_without_the_engine() {
    let mut h = Harness::new(refusing());
    let header = h.header(T_GET_ID, 0);
    let id = h.alloc_low(20);
    h.write(id, &[0xaa; 20]);
    let status = h.status();
    let posted = h.post(&[r(header, 16), w(id, 20), w(status, 1)], status);
    h.server.process_avail();
    assert_eq!(h.status_of(&posted), STATUS_OK);
    let mut serial = SERIAL.as_bytes().to_vec();
    serial.resize(20, 0);
    assert_eq!(h.read(id, 20), serial);
    assert_eq!(h.used(), [(u32::from(posted.head), 21)]);
}

#[test]
fn a_read_holds_its_buffers_pinned_until_the_engine_completes_it() {
    let mut h = Harness::new(holding());
    // Data in two descriptors, one in each region.
    let header = h.header(T_IN, 8);
    let low = h.alloc_low(1024);
    let high = h.alloc_high(3072);
    let status = h.status();
    let posted = h.post(
        &[r(header, 16), w(low, 1024), w(high, 3072), w(status, 1)],
        status,
    );
    h.server.process_avail();
    {
        let fake = h.fake.lock().unwrap();
        assert_eq!(
            fake.submitted,
            [(
                0,
                Op::Read {
                    offset: 4096,
                    len: 4096
                }
            )]
        );
        assert_eq!(fake.held[0].1.iovecs().len(), 2);
    }
    assert!(h.used().is_empty(), "not complete yet");
    assert_eq!(h.status_of(&posted), UNTOUCHED);
    assert_eq!(
        h.region_pins_in_use(),
        [1, 1],
        "both regions pinned while in flight"
    );
    assert_eq!(h.server.in_flight, 1);

    let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
    h.complete(0, Ok(()), &pattern);

    assert_eq!(h.status_of(&posted), STATUS_OK);
    assert_eq!(h.used(), [(u32::from(posted.head), 4097)]);
    let mut read = h.read(low, 1024);
    read.extend(h.read(high, 3072));
    assert_eq!(read, pattern, "the data landed in the guest's buffers");
    assert_eq!(
        h.region_pins_in_use(),
        [0, 0],
        "released once the used entry is written"
    );
    assert_eq!(h.server.in_flight, 0);
    assert_eq!(h.server.free.len(), usize::from(QUEUE_SIZE));
}

#[test]
fn engine_errors_become_ioerr_and_cancellations_are_counted() {
    let mut h = Harness::new(holding());
    let data = h.alloc_low(4096);
    let failed = h.post_read(0, data, 512);
    let cancelled = h.post_read(8, data + 512, 512);
    h.server.process_avail();
    let tags: Vec<Tag> = h
        .fake
        .lock()
        .unwrap()
        .held
        .iter()
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(tags.len(), 2);
    h.complete(tags[0], Err(io::Error::from_raw_os_error(libc::EIO)), &[]);
    h.complete(
        tags[1],
        Err(io::Error::from_raw_os_error(libc::ECANCELED)),
        &[],
    );
    assert_eq!(h.status_of(&failed), STATUS_IOERR);
    assert_eq!(h.status_of(&cancelled), STATUS_IOERR);
    let mut used = h.used();
    used.sort_unstable();
    let mut expected = [
        (u32::from(failed.head), 513),
        (u32::from(cancelled.head), 513),
    ];
    expected.sort_unstable();
    assert_eq!(used, expected);
    assert_eq!(h.memory.status().cancelled, 1, "one cancellation counted");
    assert_eq!(h.server.device.totals().errors, 2);
}

#[test]
fn requests_the_engine_cannot_start_are_not_left_in_flight() {
    // Stopping a queue waits for every request in flight: one the engine failed to start must
    // be completed, and its slot freed, at once.
    let mut h = Harness::new(Fake {
        fail_at_once: true,
        ..Fake::default()
    });
    let data = h.alloc_low(4096);
    let read = h.post_read(0, data, 512);
    let header = h.header(T_DISCARD, 0);
    let (segments, len) = h.segments(&[(0, 8, 0), (64, 8, 0)]);
    let status = h.status();
    let discard = h.post(&[r(header, 16), r(segments, len), w(status, 1)], status);
    h.server.process_avail();
    assert_eq!(h.status_of(&read), STATUS_IOERR);
    assert_eq!(h.status_of(&discard), STATUS_IOERR);
    assert_eq!(h.used().len(), 2);
    assert_eq!(
        h.server.in_flight, 0,
        "counted in flight with nothing to complete it"
    );
    assert_eq!(h.server.free.len(), usize::from(QUEUE_SIZE));
    assert_eq!(h.region_pins_in_use(), [0, 0]);
}

#[test]
fn the_engine_gets_each_operation_with_what_it_needs() {
    let mut h = Harness::new(at_once());
    let data = h.alloc_low(8192);
    // A write, a flush, a discard of two ranges, write-zeroes with UNMAP; the write cache is
    // off, so the write, the discard and write-zeroes are durable on completion.
    let header = h.header(T_OUT, 16);
    let status = h.status();
    let write = h.post(&[r(header, 16), r(data, 4096), w(status, 1)], status);
    let header = h.header(T_FLUSH, 0);
    let status = h.status();
    let flush = h.post(&[r(header, 16), w(status, 1)], status);
    let header = h.header(T_DISCARD, 0);
    let (segs, segs_len) = h.segments(&[(0, 8, 0), (64, 16, 0)]);
    let status = h.status();
    let discard = h.post(&[r(header, 16), r(segs, segs_len), w(status, 1)], status);
    let header = h.header(T_WRITE_ZEROES, 0);
    let unmap = spec::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let (segs, segs_len) = h.segments(&[(128, 8, unmap)]);
    let status = h.status();
    let zeroes = h.post(&[r(header, 16), r(segs, segs_len), w(status, 1)], status);

    h.server.process_avail();

    let ops: Vec<Op> = h
        .fake
        .lock()
        .unwrap()
        .submitted
        .iter()
        .map(|(_, op)| op.clone())
        .collect();
    assert_eq!(
        ops,
        [
            Op::Write {
                offset: 16 * 512,
                len: 4096,
                dsync: true
            },
            Op::Flush,
            Op::Discard(
                vec![
                    Segment {
                        offset: 0,
                        len: 4096,
                        unmap: false
                    },
                    Segment {
                        offset: 64 * 512,
                        len: 8192,
                        unmap: false
                    },
                ],
                true
            ),
            Op::WriteZeroes(
                vec![Segment {
                    offset: 128 * 512,
                    len: 4096,
                    unmap: true
                }],
                true
            ),
        ]
    );
    for posted in [&write, &flush, &discard, &zeroes] {
        assert_eq!(h.status_of(posted), STATUS_OK, "head {}", posted.head);
    }
    assert_eq!(h.used().len(), 4);
    assert!(
        h.used().iter().all(|&(_, len)| len == 1),
        "only the status is written"
    );
    assert_eq!(h.region_pins_in_use(), [0, 0]);
}

#[test]
fn buffers_in_a_retiring_region_get_ioerr_without_io() {
    let mut h = Harness::new(refusing());
    let high = h.alloc_high(512);
    let posted = h.post_read(0, high, 512);
    // The session has started retiring the high region (REM_MEM_REG): it is still in the
    // table, but takes no new pins.
    h.mem().pins()[1].retire();
    h.server.process_avail();
    assert_eq!(h.status_of(&posted), STATUS_IOERR);
    assert_eq!(h.used(), [(u32::from(posted.head), 1)]);
    assert_eq!(h.region_pins_in_use(), [0, 0]);
}

#[test]
fn a_cancellation_picks_the_requests_in_the_retiring_region() {
    let mut h = Harness::new(holding());
    let low = h.alloc_low(512);
    let high = h.alloc_high(512);
    h.post_read(0, low, 512);
    h.post_read(0, high, 512);
    h.post_read(8, low, 512);
    h.server.process_avail();
    assert_eq!(h.fake.lock().unwrap().held.len(), 3);
    let high_pin = h.mem().pins()[1].clone();
    h.control.request_cancel(std::slice::from_ref(&high_pin));
    // The session wakes the queue thread through the control eventfd, which the engine
    // watches.
    h.server.kicked = false;
    h.fake.lock().unwrap().ready.push(Event::Watch {
        token: WAKE,
        result: 8,
    });
    h.server.reap().expect("reap");
    let fake = h.fake.lock().unwrap();
    assert_eq!(
        fake.cancelled.len(),
        1,
        "only the request in the high region"
    );
    let (_, buffers) = fake
        .held
        .iter()
        .find(|(t, _)| *t == fake.cancelled[0])
        .expect("held");
    assert!(buffers.uses_any(&[high_pin]));
    assert!(h.server.kicked, "a wake-up looks at the ring again");
}

/// What the queue loop costs per request, engine included, with nothing else running: reads of
/// 4 KiB made available 32 at a time (`VUBLK_COST_DEPTH`), taken, done and returned by one turn
/// of the loop (enter the engine, reap, take chains, notify), over and over, on the null disk
/// or (with `VUBLK_COST_IMAGE=PATH`, e.g. a file in /dev/shm) an image. Not a pass/fail test:
/// it prints the time per request, to compare two builds of the hot path without the noise of a
/// whole benchmark (`cargo test --release -p vublk --lib per_request_cost -- --ignored
/// --nocapture`).
/// Over the export's limits the loop leaves chains in the avail ring, waits (no polling) for
/// as long as the bucket needs, and takes them once they may start.
#[test]
fn over_its_limits_a_queue_leaves_chains_in_the_ring() {
    let mut h = Harness::new(at_once());
    h.server.device.set_qos(crate::qos::QosLimits {
        iops_limit: 10,
        ..Default::default()
    });
    let posted: Vec<Posted> = (0..5)
        .map(|i| {
            let data = h.alloc_low(512);
            h.post_read(i, data, 512)
        })
        .collect();
    h.server.process_avail();
    // The bucket holds a tenth of a second of the limit (one request): the request that fills
    // it starts, and one more that overfills it.
    assert_eq!(h.used().len(), 2);
    let throttled = h.server.throttled.expect("held back");
    assert!(
        !h.server.ready(),
        "a held-back queue takes nothing, kick or not"
    );
    // The bucket drains back below its capacity in 0.1 s (one request at 10 per second).
    assert_eq!(
        throttled.until - throttled.since,
        Duration::from_millis(100)
    );
    // Once the wait is over (as the serve loop ends it) and the limit gone, the rest starts.
    h.server.device.set_qos(crate::qos::QosLimits::default());
    h.server.throttled = None;
    h.server.process_avail();
    assert_eq!(h.used().len(), 5);
    for p in &posted {
        assert_eq!(h.status_of(p), STATUS_OK);
    }
}

#[test]
#[ignore]
fn per_request_cost() {
    const SIZE: u16 = 128;
    let depth: u16 = std::env::var("VUBLK_COST_DEPTH")
        .ok()
        .and_then(|d| d.parse().ok())
        .filter(|&d| (1..=32).contains(&d))
        .unwrap_or(32);
    let rounds = 640_000 / u32::from(depth);
    let memory = test_memory(&[(0, 64 << 20)]);
    let generation = memory.current();
    let mem = generation.memory();
    let (desc, avail, used) = (0u64, 0x1000u64, 0x2000u64);
    for i in 0..u64::from(depth) {
        let header = 0x10000 + i * 0x2000;
        let (data, status) = (header + 0x1000, header + 0x100);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&(i * 8).to_le_bytes());
        mem.write_slice(&h, GuestAddress(header)).unwrap();
        let chain = [
            (header, 16, VRING_DESC_F_NEXT),
            (data, 4096, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE),
            (status, 1, VRING_DESC_F_WRITE),
        ];
        for (k, &(addr, len, flags)) in chain.iter().enumerate() {
            let index = 3 * i as u16 + k as u16;
            let raw = RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, index + 1));
            mem.write_obj(raw, GuestAddress(desc + 16 * u64::from(index)))
                .unwrap();
        }
    }
    let q = RunningQueue {
        index: 0,
        queue: split_queue(SIZE, desc, avail, used),
        kick: EventFd::new(EFD_NONBLOCK).unwrap(),
        call: Arc::new(CallFd::default()),
        err: Arc::new(CallFd::default()),
        control: Arc::new(QueueControl::new(true).unwrap()),
        memory: memory.clone(),
        log: DirtyLog::default(),
        inflight: None,
        resubmit: Vec::new(),
    };
    let spec = match std::env::var_os("VUBLK_COST_IMAGE") {
        Some(path) => DiskSpec::Path(path.into()),
        None => DiskSpec::Null { size: 1 << 30 },
    };
    let disk = Disk::open(&spec, OpenOptions::default()).expect("the disk");
    let options = DeviceOptions {
        num_queues: 1,
        max_queue_size: SIZE,
        blk_size: 512,
        serial: None,
        write_cache: true,
    };
    // VUBLK_COST_QOS=1: limits no load reaches, so the limiter's whole path runs (the
    // cost of a limit against none).
    let qos = match std::env::var_os("VUBLK_COST_QOS") {
        Some(_) => crate::qos::QosLimits {
            iops_limit: 1_000_000_000_000,
            bps_limit: 1_000_000_000_000,
            ..Default::default()
        },
        None => crate::qos::QosLimits::default(),
    };
    let device = Arc::new(BlockDevice::new(disk, &options).with_qos(qos));
    let mut server = QueueServer::new(device, q).expect("a queue server");
    server.engine.start().expect("the engine starts");
    let mut idx: u16 = 0;
    let mut trials = Vec::new();
    for _ in 0..15 {
        let start = std::time::Instant::now();
        for _ in 0..rounds {
            for i in 0..depth {
                let at = avail + 4 + 2 * u64::from(idx.wrapping_add(i) % SIZE);
                mem.write_obj(3 * i, GuestAddress(at)).unwrap();
            }
            idx = idx.wrapping_add(depth);
            mem.write_obj(idx, GuestAddress(avail + 2)).unwrap();
            server.engine.enter(false).expect("enter");
            server.reap().expect("reap");
            server.process_avail();
            server.notify();
        }
        trials.push(start.elapsed().as_nanos() as f64 / f64::from(rounds * u32::from(depth)));
    }
    let done: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    assert_eq!(done, idx, "every request was completed");
    trials.sort_by(f64::total_cmp);
    eprintln!(
        "per request: {:.1} ns (fastest of 15 trials), {:.1} ns (median)",
        trials[0], trials[7]
    );
}

#[test]
fn durability_follows_the_write_cache_and_the_drivers_flush_feature() {
    let flush = 1u64 << spec::VIRTIO_BLK_F_FLUSH;
    // (write cache on, driver negotiated FLUSH) → writes, discards, write-zeroes durable.
    for (cache_on, flush_acked, durable) in [
        (true, true, false),
        (true, false, true),
        (false, true, true),
    ] {
        let mut h = Harness::new(at_once());
        let config = &h.server.device.config;
        config
            .writeback_cell()
            .store(cache_on, std::sync::atomic::Ordering::Relaxed);
        let features = config.features();
        config.set_acked_features(if flush_acked {
            features
        } else {
            features & !flush
        });
        let data = h.alloc_low(4096);
        let header = h.header(T_OUT, 16);
        let status = h.status();
        h.post(&[r(header, 16), r(data, 4096), w(status, 1)], status);
        let header = h.header(T_DISCARD, 0);
        let (segs, segs_len) = h.segments(&[(0, 8, 0)]);
        let status = h.status();
        h.post(&[r(header, 16), r(segs, segs_len), w(status, 1)], status);
        let header = h.header(T_WRITE_ZEROES, 0);
        let (segs, segs_len) = h.segments(&[(64, 8, 0)]);
        let status = h.status();
        h.post(&[r(header, 16), r(segs, segs_len), w(status, 1)], status);
        h.server.process_avail();
        let dsyncs: Vec<bool> = h
            .fake
            .lock()
            .unwrap()
            .submitted
            .iter()
            .map(|(_, op)| match op {
                Op::Write { dsync, .. } | Op::Discard(_, dsync) | Op::WriteZeroes(_, dsync) => {
                    *dsync
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            dsyncs, [durable; 3],
            "write cache {cache_on}, FLUSH negotiated {flush_acked}"
        );
    }
}

/// An engine whose I/O runs on threads of its own gets a queue thread that never polls, even
/// with `--poll-max-us` set; the others poll as set.
#[test]
fn an_engine_that_says_no_gets_a_queue_thread_that_never_polls() {
    let max = Duration::from_micros(200);
    let io_uring_like = Harness::polling(Fake::default(), max);
    assert!(io_uring_like.server.poll.enabled());
    let librbd_like = Fake {
        no_polling: true,
        ..Fake::default()
    };
    assert!(!Harness::polling(librbd_like, max).server.poll.enabled());
}

/// What the fake engine's completion thread would do: publish `tag` from a thread of its own.
fn publish_from_another_thread(h: &Harness, tag: Tag) -> Publication {
    let publisher = h.fake.lock().unwrap().publisher.clone();
    let publisher = publisher.expect("the loop offered direct completion");
    std::thread::spawn(move || publisher.publish(tag))
        .join()
        .expect("the publishing thread")
}

/// The fake engine reports the held request `tag`, which its thread published, and the loop
/// reaps it.
fn report_published(h: &mut Harness, tag: Tag) {
    {
        let mut fake = h.fake.lock().unwrap();
        let at = fake.held.iter().position(|(t, _)| *t == tag).unwrap();
        let (_, buffers) = fake.held.remove(at);
        let mut done = Completion::new(tag, Ok(()), buffers);
        done.published = true;
        fake.ready.push(Event::Completed(done));
    }
    h.server.reap().expect("reap");
    h.server.notify();
}

fn direct() -> Fake {
    Fake {
        direct: true,
        ..Fake::default()
    }
}

#[test]
fn an_engine_thread_returns_a_request_to_the_driver_while_the_queue_thread_sleeps() {
    let mut h = Harness::new(direct());
    assert!(h.server.direct, "the engine took the offer");
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    h.server.q.call.set(Some(call.try_clone().unwrap()));
    let data = h.alloc_low(512);
    let posted = h.post_read(0, data, 512);
    h.server.process_avail();
    assert_eq!(h.fake.lock().unwrap().held.len(), 1);

    assert_eq!(
        publish_from_another_thread(&h, 0),
        Publication::Refused,
        "the queue thread is awake: it holds the ring"
    );
    assert!(h.used().is_empty());
    assert_eq!(h.status_of(&posted), UNTOUCHED);

    h.server.lend();
    assert_eq!(publish_from_another_thread(&h, 0), Publication::Published);
    assert_eq!(h.status_of(&posted), STATUS_OK);
    assert_eq!(h.used(), [(u32::from(posted.head), 513)]);
    assert_eq!(call.read().unwrap(), 1, "the driver was called");
    assert_eq!(
        h.region_pins_in_use(),
        [1, 0],
        "pinned until the queue thread retires the request"
    );
    assert_eq!(h.server.in_flight, 1);

    h.server.take_back();
    report_published(&mut h, 0);
    assert_eq!(
        h.used(),
        [(u32::from(posted.head), 513)],
        "returned to the driver once"
    );
    assert!(call.read().is_err(), "and called once");
    assert_eq!(h.region_pins_in_use(), [0, 0]);
    assert_eq!(h.server.in_flight, 0);
    assert_eq!(h.server.free.len(), usize::from(QUEUE_SIZE));
    let totals = h.server.device.totals();
    assert_eq!(
        (totals.requests, totals.bytes_read, totals.calls),
        (1, 512, 1)
    );
}

#[test]
fn an_engine_that_does_not_publish_never_gets_the_ring() {
    let mut h = Harness::new(holding());
    assert!(!h.server.direct);
    let data = h.alloc_low(512);
    h.post_read(0, data, 512);
    h.server.process_avail();
    h.server.lend();
    assert_eq!(
        publish_from_another_thread(&h, 0),
        Publication::Refused,
        "a request noted for publishing only when the engine publishes"
    );
    h.server.take_back();
    assert!(h.used().is_empty());
}

#[test]
fn a_request_published_while_logging_is_marked_when_it_retires() {
    use std::os::unix::fs::FileExt;
    let mut h = Harness::new(direct());
    let file = tempfile::tempfile_in("/dev/shm").unwrap();
    file.set_len(40 << 10).unwrap();
    let map = LogMap::map(&file, 40 << 10, 0, HIGH.0 + HIGH.1).unwrap();
    h.server.q.log.install(map).unwrap();
    h.server.q.log.set_log_all(true).unwrap();
    h.control.set_used_log(Some(USED));
    let logged = || {
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 0).unwrap();
        byte[0]
    };
    // The used ring in page 0; data, header and status in page 1.
    let data = h.alloc_low(512);
    h.post_read(0, data, 512);
    h.server.process_avail();
    h.server.lend();
    assert_eq!(
        publish_from_another_thread(&h, 0),
        Publication::PublishedWake,
        "the queue thread must wake up to mark the log"
    );
    h.server.take_back();
    assert_eq!(logged(), 0, "the engine's thread marks nothing");
    report_published(&mut h, 0);
    assert_eq!(
        logged(),
        0b11,
        "the used entry (page 0) and the request's buffers (page 1)"
    );
}
