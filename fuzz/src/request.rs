//! The `request` target: a guest's split virtqueue — descriptor table, avail ring and the
//! buffers the descriptors point at, all from the input — served as a queue thread serves it
//! (virtio_blk/queue.rs): take each available chain, check its head, parse it
//! ([`vublk::virtio_blk::request::parse`]), pin its buffers ([`Generation::pin`]), write the
//! status and the used ring.
//!
//! Guest memory is three regions, mapped once and zeroed before each input: two adjacent ones
//! (a buffer may cross from one mapping into the next) and one after a hole.
//!
//! ```text
//!   0x0000  region A: descriptor table (0x0000), avail ring (0x1000), used ring (0x2000)
//!   0x4000  region B (adjacent to A)
//!   0x8000  hole
//!   0x10000 region C
//! ```
//!
//! Input: the device limits and queue setup, then the descriptor table and avail ring bytes,
//! then writes `(address, bytes)` anywhere in memory (headers, discard segments, indirect
//! tables). Checked for every accepted request: it lies inside the disk, whole sectors and
//! aligned as asked, its buffers add up to its length, lie in guest memory (pinning succeeds)
//! and respect the iovec and segment limits, and a read-only disk is never asked to write.

use std::sync::{Arc, OnceLock};

use vhost::vhost_user::message::VhostUserMemoryRegion;
use virtio_queue::QueueOwnedT;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vublk::vhost_user::{Generation, GuestMemoryHandle, RawBuffers};
use vublk::virtio_blk::request::{parse, Buffers, Limits, RequestKind, Scratch};

use crate::Input;

/// `(guest address, size)` of each region.
const REGIONS: [(u64, u64); 3] = [(0x0, 0x4000), (0x4000, 0x4000), (0x1_0000, 0x1000)];
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// Guest addresses the memory writes cover (the end of region C).
const SPAN: u64 = 0x1_1000;
/// Largest queue size: its descriptor table fills 0x0..0x1000.
const MAX_QUEUE_SIZE: u16 = 256;
/// Chains served per input at most (a looping avail index would serve forever).
const MAX_CHAINS: usize = 512;
/// Buffers up to this size are filled as a read would (larger ones only parsed).
const FILL_LIMIT: u64 = 1 << 16;

struct Guest {
    /// Keeps the table installed (and its regions' pins live).
    _handle: GuestMemoryHandle,
    generation: Arc<Generation>,
}

fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(|| {
        let handle = GuestMemoryHandle::default();
        let (table, files): (Vec<_>, Vec<_>) = REGIONS
            .iter()
            .map(|&(gpa, size)| {
                let file = crate::memfd(size).expect("a memfd for guest memory");
                let region = VhostUserMemoryRegion::new(gpa, size, 0x7f00_0000_0000 + gpa, 0);
                (region, file)
            })
            .unzip();
        let (generation, _) = handle
            .set_table(&table, files)
            .expect("the fixed memory table");
        Guest {
            _handle: handle,
            generation,
        }
    })
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = serve(&mut Input::new(data));
}

/// `capacity: u8` (0: `u16` sectors follow, 1: 1 GiB, 2: `u64::MAX` less a `u16`, 3: a `u64`),
/// `read_only: u8`, `seg_max: u16`, `max_iovecs: u16`, `discard: u8`, `write_zeroes: u8`,
/// `max_zeroing_sectors: u32`, `max_zeroing_segments: u8`, `offset_align: u8` (1, 512, 4096).
fn limits(input: &mut Input<'_>) -> Option<Limits> {
    let capacity = match input.u8()? % 4 {
        0 => u64::from(input.u16()?) * 512,
        1 => 1 << 30,
        2 => u64::MAX - u64::from(input.u16()?),
        _ => input.u64()?,
    };
    Some(Limits {
        capacity,
        read_only: input.u8()? & 1 != 0,
        seg_max: usize::from(input.u16()? % 256) + 1,
        // The device's own value, not read from the input: the seeds keep their layout.
        size_max: 1 << 20,
        max_iovecs: usize::from(input.u16()? % 1024) + 1,
        discard: input.u8()? & 1 != 0,
        write_zeroes: input.u8()? & 1 != 0,
        max_zeroing_sectors: u64::from(input.u32()?),
        max_zeroing_segments: usize::from(input.u8()? % 32) + 1,
        offset_align: [1, 512, 4096][usize::from(input.u8()? % 3)],
    })
}

/// The limits, then `size: u8` (log2, up to 8), `event_idx: u8`, `next_avail: u16`, the
/// descriptor table (16 bytes a descriptor, `size` of them), the avail ring (flags, idx, `size`
/// heads), then writes to the end: `address: u32` (modulo the span of guest memory), `len: u8`,
/// the bytes.
fn serve(input: &mut Input<'_>) -> Option<()> {
    let guest = guest();
    let generation = &guest.generation;
    let mem = generation.memory();
    let zeroes = [0u8; 0x4000];
    for &(gpa, size) in &REGIONS {
        mem.write_slice(&zeroes[..size as usize], GuestAddress(gpa))
            .expect("zero a region");
    }

    let limits = limits(input)?;
    let size = 1u16 << (input.u8()? % (MAX_QUEUE_SIZE.trailing_zeros() as u8 + 1));
    let event_idx = input.u8()? & 1 != 0;
    let next_avail = input.u16()?;
    let table = input.bytes(usize::from(size) * 16)?;
    mem.write_slice(table, GuestAddress(DESC_TABLE))
        .expect("the descriptor table fits region A");
    // flags, idx, then the ring.
    let avail = input.bytes(4 + usize::from(size) * 2)?;
    mem.write_slice(avail, GuestAddress(AVAIL_RING))
        .expect("the avail ring fits region A");
    while !input.is_empty() {
        let at = u64::from(input.u32()?) % SPAN;
        let len = usize::from(input.u8()?);
        let bytes = input.bytes(len.min(input.len()))?;
        // Into the hole: the write is refused, like a guest's would fault.
        let _ = mem.write_slice(bytes, GuestAddress(at));
    }

    let mut queue = Queue::new(MAX_QUEUE_SIZE).expect("a queue");
    queue.try_set_size(size).expect("a power of two");
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .expect("aligned");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .expect("aligned");
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("aligned");
    queue.set_event_idx(event_idx);
    queue.set_next_avail(next_avail);
    queue.set_ready(true);
    assert!(queue.is_valid(mem), "the fixed rings lie in guest memory");

    let mut scratch = Scratch::default();
    let mut segments = Vec::new();
    for _ in 0..MAX_CHAINS {
        // As QueueServer::process_avail: an error or a bad head breaks the queue.
        let chain = match queue.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(_) => break,
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        if head >= size {
            break;
        }
        let mut raw = RawBuffers::default();
        let parsed = parse(
            chain,
            mem,
            &limits,
            &mut scratch,
            Buffers {
                iovecs: raw.iovecs_mut(),
                segments: &mut segments,
            },
        );
        let status = match &parsed {
            Ok(req) => Some(req.status),
            Err(rejection) => rejection.status,
        };
        let mut buffers = generation.pin(raw, status.map(|s| s.as_ptr()));
        let used_len = match parsed {
            Ok(req) => {
                assert!(
                    buffers.is_complete(),
                    "accepted request with buffers outside guest memory: {req:?}"
                );
                check_accepted(&req, &limits, &buffers, &segments);
                if req.kind == RequestKind::Read && req.len <= FILL_LIMIT {
                    buffers.zero();
                }
                buffers.write_status(0);
                u32::try_from(req.len.saturating_add(1)).unwrap_or(u32::MAX)
            }
            Err(rejection) => {
                assert_eq!(
                    buffers.is_complete(),
                    rejection.status.is_some(),
                    "a status byte that was found but cannot be pinned: {:?}",
                    rejection.error
                );
                u32::from(buffers.write_status(rejection.code))
            }
        };
        drop(buffers.release());
        queue
            .add_used(mem, head, used_len)
            .expect("the used ring is in guest memory");
    }
    let _ = queue.needs_notification(mem);
    Some(())
}

/// What every request the parser accepts must satisfy.
fn check_accepted(
    req: &vublk::virtio_blk::request::Request,
    limits: &Limits,
    buffers: &vublk::vhost_user::GuestBuffers,
    segments: &[vublk::virtio_blk::request::Segment],
) {
    let iovecs = buffers.iovecs();
    assert!(iovecs.len() <= limits.max_iovecs, "{} iovecs", iovecs.len());
    let total: u64 = iovecs.iter().map(|v| v.iov_len as u64).sum();
    match req.kind {
        RequestKind::Read | RequestKind::Write => {
            assert!(
                !(limits.read_only && req.kind == RequestKind::Write),
                "a write to a read-only disk accepted"
            );
            assert_eq!(total, req.len, "iovecs do not add up to the request");
            assert_eq!(req.len % 512, 0, "partial sector accepted");
            assert_eq!(req.offset % limits.offset_align, 0, "unaligned offset");
            assert_eq!(req.len % limits.offset_align, 0, "unaligned length");
            let end = req.offset.checked_add(req.len).expect("end overflows");
            assert!(end <= limits.capacity, "request beyond the disk: {req:?}");
        }
        RequestKind::GetId => {
            assert_eq!(total, req.len);
            assert!(req.len <= 20, "GET_ID buffers beyond the serial");
        }
        RequestKind::Flush => assert!(iovecs.is_empty()),
        RequestKind::Discard | RequestKind::WriteZeroes => {
            assert!(
                !limits.read_only,
                "discard/write-zeroes on a read-only disk"
            );
            assert!(iovecs.is_empty());
            assert!(!segments.is_empty() && segments.len() <= limits.max_zeroing_segments);
            for s in segments {
                let end = s.offset.checked_add(s.len).expect("segment end overflows");
                assert!(end <= limits.capacity, "segment beyond the disk: {s:?}");
                assert!(s.len / 512 <= limits.max_zeroing_sectors);
            }
        }
    }
}
