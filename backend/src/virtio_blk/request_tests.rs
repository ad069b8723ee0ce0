//! Unit tests for the request parser: chains are built in real guest memory with virtio-queue's
//! mock driver, popped from a real split queue and handed to [`parse`], and every outcome is
//! checked down to the host addresses of the iovecs and of the status byte.
//!
//! Guest memory is two adjacent 1 MiB regions, so a buffer can straddle them:
//!
//! ```text
//!   0x0000_0000  queue (descriptor table, avail ring, used ring)
//!   0x0000_2000  indirect descriptor table
//!   0x0000_3000  request header           0x0000_3800  status byte
//!   0x0000_4000  discard / write-zeroes segments
//!   0x0001_0000  data buffers ...
//!   0x0010_0000  ---- region boundary ----
//!   0x0020_0000  end of guest memory      0x4000_0000  nothing there
//! ```

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::*;

const QUEUE_SIZE: u16 = 256;
const INDIRECT_TABLE: u64 = 0x2000;
const HDR: u64 = 0x3000;
const STATUS: u64 = 0x3800;
const SEGS: u64 = 0x4000;
const DATA: u64 = 0x1_0000;
const BOUNDARY: u64 = 0x10_0000;
const MEM_END: u64 = 0x20_0000;
const OUTSIDE: u64 = 0x4000_0000;

/// 1 MiB disk: 2048 sectors.
const CAPACITY: u64 = 1 << 20;
const CAPACITY_SECTORS: u64 = CAPACITY / SECTOR_SIZE;

const T_IN: u32 = spec::VIRTIO_BLK_T_IN;
const T_OUT: u32 = spec::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = spec::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = spec::VIRTIO_BLK_T_GET_ID;
const T_DISCARD: u32 = spec::VIRTIO_BLK_T_DISCARD;
const T_WRITE_ZEROES: u32 = spec::VIRTIO_BLK_T_WRITE_ZEROES;
const UNMAP: u32 = spec::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
const IOERR: u8 = spec::VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = spec::VIRTIO_BLK_S_UNSUPP as u8;

fn limits() -> Limits {
    Limits {
        capacity: CAPACITY,
        read_only: false,
        seg_max: 8,
        size_max: 1 << 20,
        max_iovecs: 16,
        discard: true,
        write_zeroes: true,
        max_zeroing_sectors: 256,
        max_zeroing_segments: 4,
        offset_align: 1,
    }
}

/// One descriptor of a chain to build; `NEXT` and `next` are filled in by the builder.
#[derive(Clone, Copy)]
struct D {
    addr: u64,
    len: u32,
    writable: bool,
}

/// A device-readable descriptor.
fn r(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        writable: false,
    }
}

/// A device-writable descriptor.
fn w(addr: u64, len: u32) -> D {
    D {
        addr,
        len,
        writable: true,
    }
}

/// `struct virtio_blk_outhdr`: type, reserved (ioprio), sector.
fn header(ty: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
fn segment(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

/// Lays `descs` out as a table whose entry `i` chains to `i + 1`.
fn table(descs: &[D]) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let last = i + 1 == descs.len();
            let mut flags = if d.writable {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
        })
        .collect()
}

/// What one call to [`parse`] produced.
struct Outcome {
    result: Result<Request, Rejection>,
    /// (host address, length) of each iovec.
    iovecs: Vec<(usize, usize)>,
    segments: Vec<Segment>,
}

impl Outcome {
    #[track_caller]
    fn request(&self) -> Request {
        match &self.result {
            Ok(req) => *req,
            Err(rejection) => panic!("expected a request, got {rejection:?}"),
        }
    }

    #[track_caller]
    fn rejection(&self) -> &Rejection {
        match &self.result {
            Ok(req) => panic!("expected a rejection, got {req:?}"),
            Err(rejection) => rejection,
        }
    }
}

struct Guest {
    mem: GuestMemoryMmap,
}

impl Guest {
    fn new() -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), BOUNDARY as usize),
            (GuestAddress(BOUNDARY), (MEM_END - BOUNDARY) as usize),
        ])
        .expect("guest memory");
        Guest { mem }
    }

    fn write(&self, addr: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .expect("write guest memory");
    }

    fn read_byte(&self, addr: u64) -> u8 {
        self.mem
            .read_obj(GuestAddress(addr))
            .expect("read guest memory")
    }

    fn host(&self, addr: u64) -> usize {
        self.mem
            .get_host_address(GuestAddress(addr))
            .expect("mapped") as usize
    }

    /// The iovec the parser should produce for guest range `addr..addr+len`.
    fn iov(&self, addr: u64, len: usize) -> (usize, usize) {
        (self.host(addr), len)
    }

    /// Makes `descs` available as one chain and parses it.
    fn parse(&self, descs: &[D], limits: &Limits) -> Outcome {
        let vq = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        vq.add_desc_chains(&table(descs), 0).expect("add chain");
        self.pop_and_parse(&vq, limits)
    }

    /// Same, with `descs` in an indirect table that the ring's only descriptor points at.
    fn parse_indirect(&self, descs: &[D], limits: &Limits) -> Outcome {
        for (i, raw) in table(descs).into_iter().enumerate() {
            self.mem
                .write_obj(raw, GuestAddress(INDIRECT_TABLE + 16 * i as u64))
                .expect("write indirect table");
        }
        let vq = MockSplitQueue::create(&self.mem, GuestAddress(0), QUEUE_SIZE);
        let len = 16 * descs.len() as u32;
        let head = SplitDescriptor::new(INDIRECT_TABLE, len, VRING_DESC_F_INDIRECT as u16, 0);
        vq.add_desc_chains(&[RawDescriptor::from(head)], 0)
            .expect("add chain");
        self.pop_and_parse(&vq, limits)
    }

    /// Hands `descs` to [`parse`] as they are, without a ring (nor the limits virtio-queue puts
    /// on a chain).
    fn parse_unchecked(&self, descs: &[D], limits: &Limits) -> Outcome {
        let chain = table(descs).into_iter().map(SplitDescriptor::from);
        self.parse_chain(chain, limits)
    }

    fn pop_and_parse(&self, vq: &MockSplitQueue<'_, GuestMemoryMmap>, limits: &Limits) -> Outcome {
        let mut queue: Queue = vq.create_queue().expect("queue");
        let chain = queue
            .pop_descriptor_chain(&self.mem)
            .expect("a chain is available");
        self.parse_chain(chain, limits)
    }

    fn parse_chain(&self, chain: impl Iterator<Item = Descriptor>, limits: &Limits) -> Outcome {
        // Leftovers from a previous request, which parse must clear.
        let mut iovecs = vec![libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 7,
        }];
        let mut segments = vec![Segment {
            offset: 1,
            len: 2,
            unmap: true,
        }];
        let mut scratch = Scratch::default();
        let result = parse(
            chain,
            &self.mem,
            limits,
            &mut scratch,
            Buffers {
                iovecs: &mut iovecs,
                segments: &mut segments,
            },
        );
        Outcome {
            result,
            iovecs: iovecs
                .iter()
                .map(|v| (v.iov_base as usize, v.iov_len))
                .collect(),
            segments,
        }
    }

    /// Checks that `status` points at guest byte `addr` and that writing through it lands there
    /// and nowhere else.
    #[track_caller]
    fn assert_status_at(&self, status: StatusByte, addr: u64, code: u8) {
        assert_eq!(
            status.0.as_ptr() as usize,
            self.host(addr),
            "status byte address"
        );
        let before = self.read_byte(addr - 1);
        // SAFETY: `self.mem`, the mapping the chain was parsed against, is alive and borrowed.
        unsafe { status.as_ptr().cast_mut().write_volatile(code) };
        assert_eq!(self.read_byte(addr), code, "status byte in guest memory");
        assert_eq!(
            self.read_byte(addr - 1),
            before,
            "the byte before the status is untouched"
        );
    }

    /// Checks a rejection completely: code, error, and where its status byte is (if any).
    #[track_caller]
    fn assert_rejected(
        &self,
        out: &Outcome,
        code: u8,
        error: RequestError,
        status_at: Option<u64>,
    ) {
        let rejection = out.rejection();
        assert_eq!(
            rejection.code, code,
            "status code for {:?}",
            rejection.error
        );
        assert_eq!(rejection.error, error);
        match (rejection.status, status_at) {
            (Some(status), Some(addr)) => self.assert_status_at(status, addr, rejection.code),
            (None, None) => {}
            (got, want) => panic!("status byte: got {got:?}, want one at {want:x?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Every request type, in the layout Linux uses: header | data... | status.

#[test]
fn read() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 8));
    let out = g.parse(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Read, 8 * 512, 4096)
    );
    assert_eq!(out.iovecs, vec![g.iov(DATA, 4096)]);
    assert!(out.segments.is_empty());
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn write() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 2040));
    let out = g.parse(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)], &limits());
    let req = out.request();
    // The last 8 sectors of the disk.
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Write, 2040 * 512, 4096)
    );
    assert_eq!(out.iovecs, vec![g.iov(DATA, 4096)]);
    assert!(out.segments.is_empty());
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn flush() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[r(HDR, 16), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!((req.kind, req.offset, req.len), (RequestKind::Flush, 0, 0));
    assert!(out.iovecs.is_empty());
    assert!(out.segments.is_empty());
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn get_id_with_a_20_byte_buffer() {
    let g = Guest::new();
    g.write(HDR, &header(T_GET_ID, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!((req.kind, req.offset, req.len), (RequestKind::GetId, 0, 20));
    assert_eq!(out.iovecs, vec![g.iov(DATA, 20)]);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn get_id_with_a_shorter_buffer_gets_what_fits() {
    let g = Guest::new();
    g.write(HDR, &header(T_GET_ID, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 8), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::GetId, 8));
    assert_eq!(out.iovecs, vec![g.iov(DATA, 8)]);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn get_id_with_a_longer_buffer_is_capped_at_20_bytes() {
    let g = Guest::new();
    g.write(HDR, &header(T_GET_ID, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::GetId, 20));
    assert_eq!(out.iovecs, vec![g.iov(DATA, 20)]);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn get_id_buffer_split_over_two_descriptors() {
    let g = Guest::new();
    g.write(HDR, &header(T_GET_ID, 0));
    let out = g.parse(
        &[r(HDR, 16), w(DATA, 12), w(DATA + 0x1000, 8), w(STATUS, 1)],
        &limits(),
    );
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::GetId, 20));
    assert_eq!(out.iovecs, vec![g.iov(DATA, 12), g.iov(DATA + 0x1000, 8)]);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn discard_one_segment() {
    let g = Guest::new();
    g.write(HDR, &header(T_DISCARD, 0));
    g.write(SEGS, &segment(100, 8, 0));
    let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Discard, 0, 0)
    );
    assert!(out.iovecs.is_empty());
    assert_eq!(
        out.segments,
        vec![Segment {
            offset: 100 * 512,
            len: 8 * 512,
            unmap: false
        }]
    );
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn discard_several_segments() {
    let g = Guest::new();
    g.write(HDR, &header(T_DISCARD, 0));
    let mut list = Vec::new();
    list.extend(segment(0, 1, 0));
    list.extend(segment(2000, 48, 0));
    list.extend(segment(7, 256, 0));
    g.write(SEGS, &list);
    let out = g.parse(&[r(HDR, 16), r(SEGS, 48), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!(req.kind, RequestKind::Discard);
    assert_eq!(
        out.segments,
        vec![
            Segment {
                offset: 0,
                len: 512,
                unmap: false
            },
            Segment {
                offset: 2000 * 512,
                len: 48 * 512,
                unmap: false
            },
            Segment {
                offset: 7 * 512,
                len: 256 * 512,
                unmap: false
            },
        ]
    );
    assert!(out.iovecs.is_empty());
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn write_zeroes_one_segment_with_unmap() {
    let g = Guest::new();
    g.write(HDR, &header(T_WRITE_ZEROES, 0));
    g.write(SEGS, &segment(64, 16, UNMAP));
    let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::WriteZeroes, 0, 0)
    );
    assert_eq!(
        out.segments,
        vec![Segment {
            offset: 64 * 512,
            len: 16 * 512,
            unmap: true
        }]
    );
    assert!(out.iovecs.is_empty());
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn write_zeroes_several_segments_split_across_descriptors() {
    let g = Guest::new();
    g.write(HDR, &header(T_WRITE_ZEROES, 0));
    let mut list = Vec::new();
    list.extend(segment(1, 2, 0));
    list.extend(segment(10, 20, UNMAP));
    list.extend(segment(2047, 1, 0));
    g.write(SEGS, &list);
    // The second segment is cut in the middle of its num_sectors field.
    let descs = [r(HDR, 16), r(SEGS, 26), r(SEGS + 26, 22), w(STATUS, 1)];
    let out = g.parse(&descs, &limits());
    let req = out.request();
    assert_eq!(req.kind, RequestKind::WriteZeroes);
    assert_eq!(
        out.segments,
        vec![
            Segment {
                offset: 512,
                len: 1024,
                unmap: false
            },
            Segment {
                offset: 10 * 512,
                len: 20 * 512,
                unmap: true
            },
            Segment {
                offset: 2047 * 512,
                len: 512,
                unmap: false
            },
        ]
    );
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn unknown_type_is_unsupp() {
    for ty in [2, 10, 14, 99, u32::MAX] {
        let g = Guest::new();
        g.write(HDR, &header(ty, 0));
        let out = g.parse(&[r(HDR, 16), w(STATUS, 1)], &limits());
        g.assert_rejected(&out, UNSUPP, RequestError::Unsupported(ty), Some(STATUS));
    }
}

// ---------------------------------------------------------------------------------------------
// Layouts other than Linux's: the spec lets the driver split the request anywhere.

#[test]
fn header_split_across_two_descriptors() {
    let g = Guest::new();
    let h = header(T_IN, 3);
    g.write(HDR, &h[..8]);
    g.write(HDR + 0x100, &h[8..]);
    let out = g.parse(
        &[r(HDR, 8), r(HDR + 0x100, 8), w(DATA, 1024), w(STATUS, 1)],
        &limits(),
    );
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Read, 3 * 512, 1024)
    );
    assert_eq!(out.iovecs, vec![g.iov(DATA, 1024)]);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn header_split_across_three_descriptors_with_data_in_the_last() {
    let g = Guest::new();
    let h = header(T_OUT, 5);
    // The sector field itself is cut in two.
    g.write(HDR, &h[..4]);
    g.write(HDR + 0x100, &h[4..11]);
    g.write(DATA, &h[11..]);
    let descs = [
        r(HDR, 4),
        r(HDR + 0x100, 7),
        r(DATA, 5 + 512),
        r(DATA + 0x1000, 512),
        w(STATUS, 1),
    ];
    let out = g.parse(&descs, &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Write, 5 * 512, 1024)
    );
    assert_eq!(
        out.iovecs,
        vec![g.iov(DATA + 5, 512), g.iov(DATA + 0x1000, 512)]
    );
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn write_with_header_and_data_in_one_descriptor() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 1));
    let out = g.parse(&[r(HDR, 16 + 2048), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Write, 512, 2048)
    );
    assert_eq!(out.iovecs, vec![g.iov(HDR + 16, 2048)]);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn read_with_data_and_status_in_one_descriptor() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 1024 + 1)], &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Read, 0, 1024)
    );
    assert_eq!(out.iovecs, vec![g.iov(DATA, 1024)]);
    g.assert_status_at(req.status, DATA + 1024, 0);
}

#[test]
fn whole_request_in_two_descriptors_one_each_way() {
    let g = Guest::new();
    g.write(HDR, &header(T_GET_ID, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 20 + 1)], &limits());
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::GetId, 20));
    assert_eq!(out.iovecs, vec![g.iov(DATA, 20)]);
    g.assert_status_at(req.status, DATA + 20, 0);
}

#[test]
fn read_into_many_data_descriptors() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 16));
    // 7 scattered buffers of different sizes, backwards in memory.
    let bufs: Vec<(u64, u32)> = (0..7u64)
        .map(|i| (DATA + 0x8000 - i * 0x1000, 512 * (1 + i as u32 % 3)))
        .collect();
    let mut descs = vec![r(HDR, 16)];
    descs.extend(bufs.iter().map(|&(a, l)| w(a, l)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &limits());
    let req = out.request();
    let total: u64 = bufs.iter().map(|&(_, l)| u64::from(l)).sum();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Read, 16 * 512, total)
    );
    let want: Vec<_> = bufs.iter().map(|&(a, l)| g.iov(a, l as usize)).collect();
    assert_eq!(out.iovecs, want);
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn write_from_many_data_descriptors() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..8).map(|i| r(DATA + i * 0x1000, 512)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Write, 0, 8 * 512)
    );
    let want: Vec<_> = (0..8).map(|i| g.iov(DATA + i * 0x1000, 512)).collect();
    assert_eq!(out.iovecs, want);
}

#[test]
fn buffer_crossing_memory_regions_becomes_two_iovecs() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(
        &[r(HDR, 16), w(BOUNDARY - 512, 1536), w(STATUS, 1)],
        &limits(),
    );
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::Read, 1536));
    assert_eq!(
        out.iovecs,
        vec![g.iov(BOUNDARY - 512, 512), g.iov(BOUNDARY, 1024)]
    );
    // The two regions are separate mappings: the iovecs really are split.
    assert_ne!(g.host(BOUNDARY - 512) + 512, g.host(BOUNDARY));
}

#[test]
fn status_descriptor_crossing_regions_points_at_its_last_byte() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[r(HDR, 16), w(BOUNDARY - 2, 4)], &limits());
    let req = out.request();
    assert_eq!(req.kind, RequestKind::Flush);
    g.assert_status_at(req.status, BOUNDARY + 1, 0);
}

#[test]
fn indirect_table() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 100));
    let descs = [
        r(HDR, 16),
        w(DATA, 512),
        w(DATA + 0x1000, 1024),
        w(STATUS, 1),
    ];
    let out = g.parse_indirect(&descs, &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Read, 100 * 512, 1536)
    );
    assert_eq!(
        out.iovecs,
        vec![g.iov(DATA, 512), g.iov(DATA + 0x1000, 1024)]
    );
    g.assert_status_at(req.status, STATUS, 0);
}

#[test]
fn indirect_table_rejection_still_finds_the_status() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse_indirect(&[r(HDR, 16), r(DATA, 100), w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::PartialSector(100), Some(STATUS));
}

#[test]
fn status_is_the_last_byte_of_a_longer_last_descriptor() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[r(HDR, 16), w(STATUS, 8)], &limits());
    g.assert_status_at(out.request().status, STATUS + 7, 0);
}

#[test]
// The IN arm checks `writable.len() > limits.seg_max`, and `writable` includes the status
// descriptor: the read below is refused with TooManySegments(5).
fn read_with_exactly_seg_max_data_descriptors_and_separate_status() {
    // Linux sizes requests to seg_max data segments and adds the header and the status
    // descriptors on top (virtblk_add_req), so this is the largest read a driver sends.
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let l = Limits {
        seg_max: 4,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..4).map(|i| w(DATA + i * 0x1000, 512)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &l);
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::Read, 4 * 512));
    assert_eq!(out.iovecs.len(), 4);
}

#[test]
fn write_with_exactly_seg_max_data_descriptors() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let l = Limits {
        seg_max: 4,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..4).map(|i| r(DATA + i * 0x1000, 512)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &l);
    let req = out.request();
    assert_eq!((req.kind, req.len), (RequestKind::Write, 4 * 512));
    assert_eq!(out.iovecs.len(), 4);
}

#[test]
fn read_only_disk_still_serves_reads_flushes_and_get_id() {
    let g = Guest::new();
    let l = Limits {
        read_only: true,
        ..limits()
    };
    g.write(HDR, &header(T_IN, 0));
    assert_eq!(
        g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &l)
            .request()
            .kind,
        RequestKind::Read
    );
    g.write(HDR, &header(T_FLUSH, 0));
    assert_eq!(
        g.parse(&[r(HDR, 16), w(STATUS, 1)], &l).request().kind,
        RequestKind::Flush
    );
    g.write(HDR, &header(T_GET_ID, 0));
    assert_eq!(
        g.parse(&[r(HDR, 16), w(DATA, 20), w(STATUS, 1)], &l)
            .request()
            .kind,
        RequestKind::GetId
    );
}

#[test]
fn o_direct_aligned_request_passes() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 8));
    let l = Limits {
        offset_align: 4096,
        ..limits()
    };
    let out = g.parse(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)], &l);
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Write, 4096, 4096)
    );
}

#[test]
fn zero_length_read_is_accepted() {
    // Nothing in the spec forbids it; it must not trip the arithmetic.
    let g = Guest::new();
    g.write(HDR, &header(T_IN, CAPACITY_SECTORS));
    let out = g.parse(&[r(HDR, 16), w(STATUS, 1)], &limits());
    let req = out.request();
    assert_eq!(
        (req.kind, req.offset, req.len),
        (RequestKind::Read, CAPACITY, 0)
    );
    assert!(out.iovecs.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Malformed chains.

#[test]
fn no_writable_descriptor_means_no_status() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(&[r(HDR, 16), r(DATA, 512)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::NoStatus, None);
}

#[test]
fn status_descriptor_of_length_zero_means_no_status() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[r(HDR, 16), w(STATUS, 0)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::NoStatus, None);
}

#[test]
fn status_descriptor_outside_memory_means_no_status() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[r(HDR, 16), w(OUTSIDE, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::NoStatus, None);
    // Its last byte past the end of guest memory, its first inside.
    let out = g.parse(&[r(HDR, 16), w(MEM_END - 1, 2)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::NoStatus, None);
    // Address arithmetic that wraps.
    let out = g.parse(&[r(HDR, 16), w(u64::MAX, 2)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::NoStatus, None);
}

#[test]
fn header_shorter_than_16_bytes() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[r(HDR, 12), w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::HeaderTooShort(12), Some(STATUS));
    // Split, still short.
    let out = g.parse(&[r(HDR, 8), r(HDR + 8, 7), w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::HeaderTooShort(15), Some(STATUS));
    // None at all.
    let out = g.parse(&[w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::HeaderTooShort(0), Some(STATUS));
}

#[test]
fn header_in_writable_descriptor_is_not_a_header() {
    let g = Guest::new();
    g.write(HDR, &header(T_FLUSH, 0));
    let out = g.parse(&[w(HDR, 16), w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::HeaderTooShort(0), Some(STATUS));
}

#[test]
fn readable_descriptor_after_a_writable_one() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(
        &[
            r(HDR, 16),
            w(DATA, 512),
            r(DATA + 0x1000, 512),
            w(STATUS, 1),
        ],
        &limits(),
    );
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::ReadableAfterWritable,
        Some(STATUS),
    );
}

#[test]
fn read_starting_beyond_capacity() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, CAPACITY_SECTORS));
    let out = g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits());
    let error = RequestError::OutOfRange {
        sector: CAPACITY_SECTORS,
        bytes: 512,
        capacity: CAPACITY,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

#[test]
fn write_straddling_the_end_of_the_disk() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, CAPACITY_SECTORS - 1));
    let out = g.parse(&[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)], &limits());
    let error = RequestError::OutOfRange {
        sector: CAPACITY_SECTORS - 1,
        bytes: 1024,
        capacity: CAPACITY,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

#[test]
fn sector_times_512_overflows_u64() {
    let g = Guest::new();
    let sector = u64::MAX / 512 + 1;
    g.write(HDR, &header(T_IN, sector));
    let out = g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits());
    let error = RequestError::OutOfRange {
        sector,
        bytes: 512,
        capacity: CAPACITY,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

#[test]
fn offset_plus_length_overflows_u64() {
    // sector * 512 fits, adding the length does not.
    let g = Guest::new();
    let sector = u64::MAX / 512;
    g.write(HDR, &header(T_IN, sector));
    let out = g.parse(&[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)], &limits());
    let error = RequestError::OutOfRange {
        sector,
        bytes: 1024,
        capacity: CAPACITY,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

#[test]
fn data_not_a_multiple_of_512() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 1000), w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::PartialSector(1000), Some(STATUS));

    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(&[r(HDR, 16), r(DATA, 513), w(STATUS, 1)], &limits());
    g.assert_rejected(&out, IOERR, RequestError::PartialSector(513), Some(STATUS));

    // A 4-byte status descriptor leaves 3 extra bytes in the device-writable stream.
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 4)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::PartialSector(515),
        Some(STATUS + 3),
    );
}

#[test]
fn read_with_readable_data() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::WrongDirection("read"),
        Some(STATUS),
    );
}

#[test]
fn write_with_writable_data() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::WrongDirection("write"),
        Some(STATUS),
    );
}

#[test]
fn discard_and_write_zeroes_with_writable_data() {
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        let g = Guest::new();
        g.write(HDR, &header(ty, 0));
        g.write(SEGS, &segment(0, 1, 0));
        let out = g.parse(
            &[r(HDR, 16), r(SEGS, 16), w(DATA, 512), w(STATUS, 1)],
            &limits(),
        );
        g.assert_rejected(
            &out,
            IOERR,
            RequestError::WrongDirection("discard/write-zeroes"),
            Some(STATUS),
        );
    }
}

#[test]
fn read_data_outside_guest_memory() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(&[r(HDR, 16), w(OUTSIDE, 512), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::OutsideMemory {
            addr: OUTSIDE,
            len: 512,
        },
        Some(STATUS),
    );
}

#[test]
fn write_data_running_off_the_end_of_guest_memory() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(
        &[r(HDR, 16), r(MEM_END - 512, 1024), w(STATUS, 1)],
        &limits(),
    );
    let error = RequestError::OutsideMemory {
        addr: MEM_END - 512,
        len: 1024,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

#[test]
fn header_outside_guest_memory() {
    let g = Guest::new();
    let out = g.parse(&[r(OUTSIDE, 16), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::OutsideMemory {
            addr: OUTSIDE,
            len: 16,
        },
        Some(STATUS),
    );
}

#[test]
fn header_and_data_address_wrapping_around() {
    // addr + 16 (the data after the header) overflows u64.
    let g = Guest::new();
    let out = g.parse(&[r(u64::MAX - 7, 16 + 512), w(STATUS, 1)], &limits());
    assert_eq!(out.rejection().code, IOERR);
    assert!(
        matches!(out.rejection().error, RequestError::OutsideMemory { .. }),
        "{:?}",
        out.rejection()
    );
}

#[test]
fn segment_list_outside_guest_memory() {
    let g = Guest::new();
    g.write(HDR, &header(T_DISCARD, 0));
    let out = g.parse(&[r(HDR, 16), r(OUTSIDE, 16), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::OutsideMemory {
            addr: OUTSIDE,
            len: 16,
        },
        Some(STATUS),
    );
}

#[test]
fn get_id_buffer_outside_guest_memory() {
    let g = Guest::new();
    g.write(HDR, &header(T_GET_ID, 0));
    let out = g.parse(&[r(HDR, 16), w(OUTSIDE, 20), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        IOERR,
        RequestError::OutsideMemory {
            addr: OUTSIDE,
            len: 20,
        },
        Some(STATUS),
    );
}

#[test]
fn read_with_more_data_descriptors_than_seg_max() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let l = Limits {
        seg_max: 4,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..5).map(|i| w(DATA + i * 0x1000, 512)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &l);
    let rejection = out.rejection();
    assert_eq!(rejection.code, IOERR);
    assert!(
        matches!(rejection.error, RequestError::TooManySegments(_)),
        "{rejection:?}"
    );
    g.assert_status_at(rejection.status.expect("status"), STATUS, IOERR);
}

#[test]
fn write_with_more_data_descriptors_than_seg_max() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let l = Limits {
        seg_max: 4,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..5).map(|i| r(DATA + i * 0x1000, 512)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &l);
    let rejection = out.rejection();
    assert_eq!(rejection.code, IOERR);
    assert!(
        matches!(rejection.error, RequestError::TooManySegments(_)),
        "{rejection:?}"
    );
    g.assert_status_at(rejection.status.expect("status"), STATUS, IOERR);
}

#[test]
fn data_segments_longer_than_size_max_are_refused() {
    let g = Guest::new();
    let l = Limits {
        size_max: 4096,
        ..limits()
    };
    // At the limit, in both directions: served.
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(&[r(HDR, 16), w(DATA, 4096), w(STATUS, 1)], &l);
    assert_eq!(out.request().len, 4096);
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)], &l);
    assert_eq!(out.request().len, 4096);
    // One sector more, in the middle of a chain of short ones: refused, whatever direction.
    let too_long = RequestError::SegmentTooLong {
        len: 4608,
        max: 4096,
    };
    g.write(HDR, &header(T_IN, 0));
    let out = g.parse(
        &[
            r(HDR, 16),
            w(DATA, 512),
            w(DATA, 4608),
            w(DATA, 512),
            w(STATUS, 1),
        ],
        &l,
    );
    g.assert_rejected(&out, IOERR, too_long.clone(), Some(STATUS));
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(&[r(HDR, 16), r(DATA, 4608), w(STATUS, 1)], &l);
    g.assert_rejected(&out, IOERR, too_long.clone(), Some(STATUS));
    // The data in the header's descriptor counts too, and an indirect table changes nothing.
    let out = g.parse_indirect(&[r(HDR, 16 + 4608), w(STATUS, 1)], &l);
    g.assert_rejected(&out, IOERR, too_long, Some(STATUS));
}

#[test]
fn a_segment_aliased_many_times_counts_every_time() {
    // Descriptors may all point at the same guest buffer: seg_max bounds them, not the guest's
    // memory.
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let l = Limits {
        seg_max: 4,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..5).map(|_| w(DATA, 4096)));
    descs.push(w(STATUS, 1));
    let out = g.parse_indirect(&descs, &l);
    g.assert_rejected(&out, IOERR, RequestError::TooManySegments(5), Some(STATUS));
}

#[test]
fn a_request_longer_than_a_used_length_can_say_is_refused() {
    // used.len is 32 bits. 4097 descriptors of 1 MiB, every one the same guest memory (the
    // whole high region), make a read of 4097 MiB whose used.len (data + status) would wrap
    // around to 1 MiB + 1. virtio-queue ends a chain at 4 GiB, so the descriptors go to the
    // parser directly: it must not rely on that.
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let l = Limits {
        capacity: 8 << 30,
        seg_max: 8192,
        max_iovecs: 8192,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..4097).map(|_| w(BOUNDARY, 1 << 20)));
    descs.push(w(STATUS, 1));
    let out = g.parse_unchecked(&descs, &l);
    g.assert_rejected(&out, IOERR, RequestError::TooLong(4097 << 20), Some(STATUS));
    // The longest read whose used.len fits is served.
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..4095).map(|_| w(BOUNDARY, 1 << 20)));
    descs.push(w(BOUNDARY, (1 << 20) - 512));
    descs.push(w(STATUS, 1));
    let out = g.parse_unchecked(&descs, &l);
    assert_eq!(out.request().len, (4096 << 20) - 512);
    assert_eq!(
        used_len(RequestKind::Read, out.request().len),
        u32::MAX - 510
    );
}

#[test]
fn used_len_never_wraps() {
    assert_eq!(used_len(RequestKind::Read, 4096), 4097);
    assert_eq!(used_len(RequestKind::GetId, 20), 21);
    assert_eq!(used_len(RequestKind::Write, 1 << 40), 1);
    assert_eq!(used_len(RequestKind::Read, u64::from(u32::MAX)), u32::MAX);
    assert_eq!(used_len(RequestKind::Read, 1 << 32), u32::MAX);
}

#[test]
fn more_iovecs_than_max_iovecs() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let l = Limits {
        seg_max: 32,
        max_iovecs: 4,
        ..limits()
    };
    let mut descs = vec![r(HDR, 16)];
    descs.extend((0..5).map(|i| w(DATA + i * 0x1000, 512)));
    descs.push(w(STATUS, 1));
    let out = g.parse(&descs, &l);
    g.assert_rejected(&out, IOERR, RequestError::TooManySegments(5), Some(STATUS));
}

#[test]
fn one_descriptor_split_by_a_region_boundary_counts_two_iovecs() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let l = Limits {
        max_iovecs: 1,
        ..limits()
    };
    let out = g.parse(&[r(HDR, 16), r(BOUNDARY - 512, 1024), w(STATUS, 1)], &l);
    g.assert_rejected(&out, IOERR, RequestError::TooManySegments(2), Some(STATUS));
    // The same request within one region fits.
    let out = g.parse(&[r(HDR, 16), r(DATA, 1024), w(STATUS, 1)], &l);
    assert_eq!(out.iovecs, vec![g.iov(DATA, 1024)]);
}

#[test]
fn read_only_disk_refuses_writes_discards_and_write_zeroes() {
    let l = Limits {
        read_only: true,
        ..limits()
    };
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 0));
    let out = g.parse(&[r(HDR, 16), r(DATA, 512), w(STATUS, 1)], &l);
    g.assert_rejected(&out, IOERR, RequestError::ReadOnly, Some(STATUS));
    assert!(out.iovecs.is_empty(), "no data mapped for a refused write");

    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        g.write(HDR, &header(ty, 0));
        g.write(SEGS, &segment(0, 8, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &l);
        g.assert_rejected(&out, IOERR, RequestError::ReadOnly, Some(STATUS));
        assert!(out.segments.is_empty());
    }
}

#[test]
fn discard_or_write_zeroes_not_offered_is_unsupp() {
    let g = Guest::new();
    g.write(SEGS, &segment(0, 8, 0));
    let l = Limits {
        discard: false,
        write_zeroes: false,
        ..limits()
    };
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        g.write(HDR, &header(ty, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &l);
        g.assert_rejected(&out, UNSUPP, RequestError::Unsupported(ty), Some(STATUS));
    }
    // Offering one does not offer the other.
    g.write(HDR, &header(T_DISCARD, 0));
    let out = g.parse(
        &[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)],
        &Limits {
            discard: false,
            ..limits()
        },
    );
    g.assert_rejected(
        &out,
        UNSUPP,
        RequestError::Unsupported(T_DISCARD),
        Some(STATUS),
    );
    g.write(HDR, &header(T_WRITE_ZEROES, 0));
    let out = g.parse(
        &[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)],
        &Limits {
            write_zeroes: false,
            ..limits()
        },
    );
    g.assert_rejected(
        &out,
        UNSUPP,
        RequestError::Unsupported(T_WRITE_ZEROES),
        Some(STATUS),
    );
}

#[test]
fn discard_with_the_unmap_flag_is_unsupp() {
    let g = Guest::new();
    g.write(HDR, &header(T_DISCARD, 0));
    g.write(SEGS, &segment(0, 8, UNMAP));
    let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
    g.assert_rejected(
        &out,
        UNSUPP,
        RequestError::SegmentFlags(UNMAP),
        Some(STATUS),
    );
}

#[test]
fn unknown_segment_flags_are_unsupp() {
    let g = Guest::new();
    for (ty, flags) in [
        (T_DISCARD, 2),
        (T_WRITE_ZEROES, 2),
        (T_WRITE_ZEROES, UNMAP | 0x8000_0000),
    ] {
        g.write(HDR, &header(ty, 0));
        // A good segment first: one bad segment refuses the whole request.
        let mut list = Vec::new();
        list.extend(segment(0, 8, 0));
        list.extend(segment(16, 8, flags));
        g.write(SEGS, &list);
        let out = g.parse(&[r(HDR, 16), r(SEGS, 32), w(STATUS, 1)], &limits());
        g.assert_rejected(
            &out,
            UNSUPP,
            RequestError::SegmentFlags(flags),
            Some(STATUS),
        );
    }
}

#[test]
fn segment_list_not_a_multiple_of_16_or_empty() {
    let g = Guest::new();
    g.write(SEGS, &segment(0, 8, 0));
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        g.write(HDR, &header(ty, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 24), w(STATUS, 1)], &limits());
        g.assert_rejected(&out, IOERR, RequestError::BadSegmentList(24), Some(STATUS));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 15), w(STATUS, 1)], &limits());
        g.assert_rejected(&out, IOERR, RequestError::BadSegmentList(15), Some(STATUS));
        let out = g.parse(&[r(HDR, 16), w(STATUS, 1)], &limits());
        g.assert_rejected(&out, IOERR, RequestError::BadSegmentList(0), Some(STATUS));
    }
}

#[test]
fn more_segments_than_max_zeroing_segments() {
    let g = Guest::new();
    let list: Vec<u8> = (0..5).flat_map(|i| segment(i * 8, 8, 0)).collect();
    g.write(SEGS, &list);
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        g.write(HDR, &header(ty, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 5 * 16), w(STATUS, 1)], &limits());
        g.assert_rejected(&out, IOERR, RequestError::TooManySegments(5), Some(STATUS));
        // Exactly the maximum is fine.
        let out = g.parse(&[r(HDR, 16), r(SEGS, 4 * 16), w(STATUS, 1)], &limits());
        assert_eq!(out.segments.len(), 4);
    }
}

#[test]
fn segment_larger_than_max_zeroing_sectors() {
    let g = Guest::new();
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        g.write(HDR, &header(ty, 0));
        g.write(SEGS, &segment(0, 257, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
        g.assert_rejected(
            &out,
            IOERR,
            RequestError::SegmentTooLarge(257),
            Some(STATUS),
        );
        g.write(SEGS, &segment(0, u32::MAX, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
        g.assert_rejected(
            &out,
            IOERR,
            RequestError::SegmentTooLarge(u64::from(u32::MAX)),
            Some(STATUS),
        );
        // Exactly the maximum is fine.
        g.write(SEGS, &segment(0, 256, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
        assert_eq!(
            out.segments,
            vec![Segment {
                offset: 0,
                len: 256 * 512,
                unmap: false
            }]
        );
    }
}

#[test]
fn segment_beyond_capacity() {
    let g = Guest::new();
    for ty in [T_DISCARD, T_WRITE_ZEROES] {
        g.write(HDR, &header(ty, 0));
        g.write(SEGS, &segment(CAPACITY_SECTORS - 4, 8, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
        let sector = CAPACITY_SECTORS - 4;
        let error = RequestError::OutOfRange {
            sector,
            bytes: 8 * 512,
            capacity: CAPACITY,
        };
        g.assert_rejected(&out, IOERR, error, Some(STATUS));
        g.write(SEGS, &segment(u64::MAX, 1, 0));
        let out = g.parse(&[r(HDR, 16), r(SEGS, 16), w(STATUS, 1)], &limits());
        let error = RequestError::OutOfRange {
            sector: u64::MAX,
            bytes: 512,
            capacity: CAPACITY,
        };
        g.assert_rejected(&out, IOERR, error, Some(STATUS));
    }
}

#[test]
fn o_direct_unaligned_length() {
    let g = Guest::new();
    g.write(HDR, &header(T_IN, 0));
    let l = Limits {
        offset_align: 4096,
        ..limits()
    };
    let out = g.parse(&[r(HDR, 16), w(DATA, 512), w(STATUS, 1)], &l);
    let error = RequestError::Unaligned {
        offset: 0,
        len: 512,
        align: 4096,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

#[test]
fn o_direct_unaligned_offset() {
    let g = Guest::new();
    g.write(HDR, &header(T_OUT, 1));
    let l = Limits {
        offset_align: 4096,
        ..limits()
    };
    let out = g.parse(&[r(HDR, 16), r(DATA, 4096), w(STATUS, 1)], &l);
    let error = RequestError::Unaligned {
        offset: 512,
        len: 4096,
        align: 4096,
    };
    g.assert_rejected(&out, IOERR, error, Some(STATUS));
}

// ---------------------------------------------------------------------------------------------
// Buffer reuse.

#[test]
fn buffers_and_scratch_are_reused_cleanly() {
    let g = Guest::new();
    let mut scratch = Scratch::default();
    let mut iovecs = Vec::new();
    let mut segments = Vec::new();
    let mut run = |descs: &[D]| {
        let vq = MockSplitQueue::create(&g.mem, GuestAddress(0), QUEUE_SIZE);
        vq.add_desc_chains(&table(descs), 0).expect("add chain");
        let mut queue: Queue = vq.create_queue().expect("queue");
        let chain = queue.pop_descriptor_chain(&g.mem).expect("a chain");
        let bufs = Buffers {
            iovecs: &mut iovecs,
            segments: &mut segments,
        };
        let result = parse(chain, &g.mem, &limits(), &mut scratch, bufs);
        (
            result.map(|r| r.kind).map_err(|r| r.error),
            iovecs.len(),
            segments.len(),
        )
    };

    g.write(HDR, &header(T_IN, 0));
    let many: Vec<D> = [r(HDR, 16)]
        .into_iter()
        .chain((0..6).map(|i| w(DATA + i * 0x1000, 512)))
        .chain([w(STATUS, 1)])
        .collect();
    assert_eq!(run(&many), (Ok(RequestKind::Read), 6, 0));

    g.write(HDR + 0x100, &header(T_DISCARD, 0));
    g.write(SEGS, &segment(0, 1, 0));
    assert_eq!(
        run(&[r(HDR + 0x100, 16), r(SEGS, 16), w(STATUS, 1)]),
        (Ok(RequestKind::Discard), 0, 1)
    );

    // A shorter chain after a longer one: no stale descriptors from the first.
    g.write(HDR + 0x200, &header(T_FLUSH, 0));
    assert_eq!(
        run(&[r(HDR + 0x200, 16), w(STATUS, 1)]),
        (Ok(RequestKind::Flush), 0, 0)
    );
}
