//! Parsing a descriptor chain into a virtio-blk request, following the spec rather than a
//! layout: the driver may split the header, the data and the status across descriptors any
//! way it likes, so the chain is read as two byte streams — what the device reads, then what it
//! writes — and the request is cut out of them:
//!
//! ```text
//!   device-readable stream: [ header (16) | OUT data  or  discard/write-zeroes segments ]
//!   device-writable stream: [ IN data  or  GET_ID buffer                   | status (1) ]
//! ```
//!
//! Everything is checked before any I/O is issued; a bad chain becomes a [`Rejection`] that
//! says which status to write (when a status byte can be written at all).

use std::ptr::NonNull;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::spec::{self, HEADER_SIZE, SECTOR_SIZE, SEGMENT_SIZE};

/// The request types we serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Read,
    Write,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
}

/// One discard or write-zeroes range, in bytes: what the engine is asked to do.
pub use crate::io::Segment;

/// The status byte of a request, as a host address in guest memory. Only an address: the
/// request's [`GuestBuffers`](crate::vhost_user::GuestBuffers) pin it and write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusByte(NonNull<u8>);

// SAFETY: a StatusByte is never dereferenced (see above); moving the address between threads
// is fine.
unsafe impl Send for StatusByte {}

impl StatusByte {
    /// Where it is, to pin the memory region it lies in.
    pub fn as_ptr(self) -> *const u8 {
        self.0.as_ptr()
    }
}

/// A request that passed every check.
#[derive(Debug, Clone, Copy)]
pub struct Request {
    pub kind: RequestKind,
    /// Byte offset on the disk (Read, Write).
    pub offset: u64,
    /// Bytes of data: the sum of the iovecs (Read, Write, GetId).
    pub len: u64,
    pub status: StatusByte,
}

/// What a chain may contain, from the device configuration.
#[derive(Debug, Clone)]
pub struct Limits {
    pub capacity: u64,
    pub read_only: bool,
    /// Data descriptors per request (`seg_max`).
    pub seg_max: usize,
    /// Bytes of data per descriptor (`size_max`).
    pub size_max: u64,
    /// Host iovecs per request.
    pub max_iovecs: usize,
    pub discard: bool,
    pub write_zeroes: bool,
    pub max_zeroing_sectors: u64,
    pub max_zeroing_segments: usize,
    /// O_DIRECT: offsets and lengths must be multiples of this (1 when buffered).
    pub offset_align: u64,
}

/// Why a chain was refused. Every variant is the guest's doing.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum RequestError {
    #[error("guest gave no writable status byte at the end of the chain")]
    NoStatus,
    #[error("guest gave a header of {0} bytes, shorter than 16")]
    HeaderTooShort(u64),
    #[error("guest put a device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    #[error("guest gave a buffer at {addr:#x} (+{len:#x}) outside guest memory")]
    OutsideMemory { addr: u64, len: u64 },
    #[error("guest gave {0} data segments, more than the device allows")]
    TooManySegments(usize),
    #[error("guest gave a data segment of {len} bytes, more than the device's size_max of {max}")]
    SegmentTooLong { len: u64, max: u64 },
    #[error("guest gave a {0} request with data in the wrong direction")]
    WrongDirection(&'static str),
    #[error("guest asked for sectors {sector}+{bytes} bytes, beyond the disk's {capacity} bytes")]
    OutOfRange {
        sector: u64,
        bytes: u64,
        capacity: u64,
    },
    #[error("guest gave {0} bytes of data, more than a used ring entry can report")]
    TooLong(u64),
    #[error("guest gave {0} bytes of data, not a multiple of 512")]
    PartialSector(u64),
    #[error("guest request at byte {offset} (+{len}) is not aligned to the {align}-byte blocks O_DIRECT needs")]
    Unaligned { offset: u64, len: u64, align: u64 },
    #[error("guest asked a read-only disk to write")]
    ReadOnly,
    #[error("guest sent request type {0}, which is not supported")]
    Unsupported(u32),
    #[error("guest gave a discard/write-zeroes segment list of {0} bytes")]
    BadSegmentList(u64),
    #[error("guest gave a discard/write-zeroes segment with unsupported flags {0:#x}")]
    SegmentFlags(u32),
    #[error("guest gave a discard/write-zeroes segment of {0} sectors, more than allowed")]
    SegmentTooLarge(u64),
}

/// A refused chain: write `status` (if there is a status byte) and return the chain.
#[derive(Debug)]
pub struct Rejection {
    pub status: Option<StatusByte>,
    pub code: u8,
    pub error: RequestError,
}

/// One descriptor, reduced to what parsing needs.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    addr: u64,
    len: u64,
    writable: bool,
}

impl From<Descriptor> for Desc {
    fn from(d: Descriptor) -> Desc {
        Desc {
            addr: d.addr().raw_value(),
            len: u64::from(d.len()),
            writable: d.is_write_only(),
        }
    }
}

/// Reusable buffers for parsing, so the steady state allocates nothing.
#[derive(Debug, Default)]
pub struct Scratch {
    descs: Vec<Desc>,
}

/// What a parsed request fills in besides the [`Request`] itself.
pub struct Buffers<'a> {
    pub iovecs: &'a mut Vec<libc::iovec>,
    pub segments: &'a mut Vec<Segment>,
}

fn ioerr(status: Option<StatusByte>, error: RequestError) -> Rejection {
    Rejection {
        status,
        code: spec::VIRTIO_BLK_S_IOERR as u8,
        error,
    }
}

fn unsupp(status: StatusByte, error: RequestError) -> Rejection {
    Rejection {
        status: Some(status),
        code: spec::VIRTIO_BLK_S_UNSUPP as u8,
        error,
    }
}

/// Calls `f(addr, len)` for the part `[skip, skip + take)` of a byte stream made of `descs`.
fn for_range(
    descs: &[Desc],
    mut skip: u64,
    mut take: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    for d in descs {
        if take == 0 {
            break;
        }
        if skip >= d.len {
            skip -= d.len;
            continue;
        }
        let n = (d.len - skip).min(take);
        let addr = d
            .addr
            .checked_add(skip)
            .ok_or(RequestError::OutsideMemory {
                addr: d.addr,
                len: d.len,
            })?;
        f(addr, n)?;
        skip = 0;
        take -= n;
    }
    Ok(())
}

/// Host iovecs for guest range `addr..addr+len`, split where it crosses memory regions.
fn push_iovecs<M: GuestMemoryBackend>(
    mem: &M,
    mut addr: u64,
    mut len: u64,
    iovecs: &mut Vec<libc::iovec>,
    max: usize,
) -> Result<(), RequestError> {
    let outside = RequestError::OutsideMemory { addr, len };
    while len > 0 {
        let region = mem
            .find_region(GuestAddress(addr))
            .ok_or_else(|| outside.clone())?;
        let in_region = addr - region.start_addr().raw_value();
        let n = (region.len() - in_region).min(len);
        let host = region
            .get_host_address(MemoryRegionAddress(in_region))
            .map_err(|_| outside.clone())?;
        if iovecs.len() == max {
            return Err(RequestError::TooManySegments(iovecs.len() + 1));
        }
        iovecs.push(libc::iovec {
            iov_base: host.cast(),
            iov_len: n as usize,
        });
        addr += n;
        len -= n;
    }
    Ok(())
}

/// Copies `buf.len()` bytes out of the stream `descs`, starting `skip` bytes in.
fn read_stream<M: GuestMemoryBackend>(
    mem: &M,
    descs: &[Desc],
    skip: u64,
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut at = 0usize;
    for_range(descs, skip, buf.len() as u64, |addr, n| {
        let n = n as usize;
        mem.read_slice(&mut buf[at..at + n], GuestAddress(addr))
            .map_err(|_| RequestError::OutsideMemory {
                addr,
                len: n as u64,
            })?;
        at += n;
        Ok(())
    })
}

fn check_range(sector: u64, bytes: u64, limits: &Limits) -> Result<u64, RequestError> {
    let out = RequestError::OutOfRange {
        sector,
        bytes,
        capacity: limits.capacity,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(|| out.clone())?;
    let end = offset.checked_add(bytes).ok_or_else(|| out.clone())?;
    if end > limits.capacity {
        return Err(out);
    }
    Ok(offset)
}

/// Parses one chain. On success the data iovecs are in `bufs.iovecs` and the discard /
/// write-zeroes ranges in `bufs.segments` (both cleared first).
pub fn parse<M: GuestMemoryBackend>(
    chain: impl Iterator<Item = Descriptor>,
    mem: &M,
    limits: &Limits,
    scratch: &mut Scratch,
    bufs: Buffers<'_>,
) -> Result<Request, Rejection> {
    bufs.iovecs.clear();
    bufs.segments.clear();
    let descs = &mut scratch.descs;
    descs.clear();
    descs.extend(chain.map(Desc::from));

    // The status is the last byte of the last descriptor, which must be device-writable.
    let status = match descs.last() {
        Some(last) if last.writable && last.len > 0 => last
            .addr
            .checked_add(last.len - 1)
            .and_then(|addr| mem.get_host_address(GuestAddress(addr)).ok())
            .and_then(NonNull::new)
            .map(StatusByte),
        _ => None,
    };
    let Some(status) = status else {
        return Err(ioerr(None, RequestError::NoStatus));
    };

    let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    if descs[first_writable..].iter().any(|d| !d.writable) {
        return Err(ioerr(Some(status), RequestError::ReadableAfterWritable));
    }
    let (readable, writable) = descs.split_at(first_writable);
    let readable_len: u64 = readable.iter().map(|d| d.len).sum();
    // Everything the device may write, less the status byte.
    let writable_len: u64 = writable.iter().map(|d| d.len).sum::<u64>() - 1;

    if readable_len < HEADER_SIZE as u64 {
        return Err(ioerr(
            Some(status),
            RequestError::HeaderTooShort(readable_len),
        ));
    }
    let mut header = [0u8; HEADER_SIZE];
    read_stream(mem, readable, 0, &mut header).map_err(|e| ioerr(Some(status), e))?;
    let req_type = u32::from_le_bytes(header[0..4].try_into().unwrap_or_default());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let payload_len = readable_len - HEADER_SIZE as u64;

    let fail = |e| ioerr(Some(status), e);
    let request = |kind, offset, len| {
        Ok(Request {
            kind,
            offset,
            len,
            status,
        })
    };

    match req_type {
        spec::VIRTIO_BLK_T_IN => {
            if payload_len != 0 {
                return Err(fail(RequestError::WrongDirection("read")));
            }
            let offset = check_data(sector, writable_len, limits).map_err(fail)?;
            check_segments(writable, 0, writable_len, limits).map_err(fail)?;
            for_range(writable, 0, writable_len, |a, n| {
                push_iovecs(mem, a, n, bufs.iovecs, limits.max_iovecs)
            })
            .map_err(fail)?;
            request(RequestKind::Read, offset, writable_len)
        }
        spec::VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            if writable_len != 0 {
                return Err(fail(RequestError::WrongDirection("write")));
            }
            let offset = check_data(sector, payload_len, limits).map_err(fail)?;
            check_segments(readable, HEADER_SIZE as u64, payload_len, limits).map_err(fail)?;
            for_range(readable, HEADER_SIZE as u64, payload_len, |a, n| {
                push_iovecs(mem, a, n, bufs.iovecs, limits.max_iovecs)
            })
            .map_err(fail)?;
            request(RequestKind::Write, offset, payload_len)
        }
        spec::VIRTIO_BLK_T_FLUSH => request(RequestKind::Flush, 0, 0),
        spec::VIRTIO_BLK_T_GET_ID => {
            let len = writable_len.min(u64::from(spec::VIRTIO_BLK_ID_BYTES));
            for_range(writable, 0, len, |a, n| {
                push_iovecs(mem, a, n, bufs.iovecs, limits.max_iovecs)
            })
            .map_err(fail)?;
            request(RequestKind::GetId, 0, len)
        }
        spec::VIRTIO_BLK_T_DISCARD | spec::VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == spec::VIRTIO_BLK_T_DISCARD;
            let (offered, kind) = if discard {
                (limits.discard, RequestKind::Discard)
            } else {
                (limits.write_zeroes, RequestKind::WriteZeroes)
            };
            if !offered {
                return Err(unsupp(status, RequestError::Unsupported(req_type)));
            }
            if limits.read_only {
                return Err(fail(RequestError::ReadOnly));
            }
            if writable_len != 0 {
                return Err(fail(RequestError::WrongDirection("discard/write-zeroes")));
            }
            if payload_len == 0 || payload_len % SEGMENT_SIZE as u64 != 0 {
                return Err(fail(RequestError::BadSegmentList(payload_len)));
            }
            let count = (payload_len / SEGMENT_SIZE as u64) as usize;
            if count > limits.max_zeroing_segments {
                return Err(fail(RequestError::TooManySegments(count)));
            }
            for i in 0..count {
                let mut raw = [0u8; SEGMENT_SIZE];
                read_stream(
                    mem,
                    readable,
                    (HEADER_SIZE + i * SEGMENT_SIZE) as u64,
                    &mut raw,
                )
                .map_err(fail)?;
                let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
                let sectors = u64::from(u32::from_le_bytes(
                    raw[8..12].try_into().unwrap_or_default(),
                ));
                let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
                // Discard has no flags; write-zeroes has UNMAP. Anything else is UNSUPP (5.2.6.2).
                let allowed = if discard {
                    0
                } else {
                    spec::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                };
                if flags & !allowed != 0 {
                    return Err(unsupp(status, RequestError::SegmentFlags(flags)));
                }
                if sectors > limits.max_zeroing_sectors {
                    return Err(fail(RequestError::SegmentTooLarge(sectors)));
                }
                let len = sectors * SECTOR_SIZE;
                let offset = check_range(sector, len, limits).map_err(fail)?;
                bufs.segments.push(Segment {
                    offset,
                    len,
                    unmap: flags & spec::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                });
            }
            request(kind, 0, 0)
        }
        other => Err(unsupp(status, RequestError::Unsupported(other))),
    }
}

/// seg_max counts the descriptors that carry data, not those holding only header or status;
/// size_max bounds the data each carries.
fn check_segments(
    descs: &[Desc],
    skip: u64,
    take: u64,
    limits: &Limits,
) -> Result<(), RequestError> {
    let mut count = 0;
    for_range(descs, skip, take, |_, len| {
        if len > limits.size_max {
            return Err(RequestError::SegmentTooLong {
                len,
                max: limits.size_max,
            });
        }
        count += 1;
        Ok(())
    })?;
    if count > limits.seg_max {
        return Err(RequestError::TooManySegments(count));
    }
    Ok(())
}

/// Bytes the device wrote into the driver's writable buffers, status byte included: what the
/// used ring entry reports. Saturates rather than wraps; `parse` refuses requests it would
/// saturate for.
pub fn used_len(kind: RequestKind, len: u64) -> u32 {
    match kind {
        RequestKind::Read | RequestKind::GetId => {
            u32::try_from(len.saturating_add(1)).unwrap_or(u32::MAX)
        }
        _ => 1,
    }
}

/// Checks a read or write: a length a used entry can report, whole sectors, inside the disk,
/// aligned for O_DIRECT.
fn check_data(sector: u64, len: u64, limits: &Limits) -> Result<u64, RequestError> {
    // used.len is 32 bits and counts the status byte too.
    if len >= u64::from(u32::MAX) {
        return Err(RequestError::TooLong(len));
    }
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::PartialSector(len));
    }
    let offset = check_range(sector, len, limits)?;
    if offset % limits.offset_align != 0 || len % limits.offset_align != 0 {
        return Err(RequestError::Unaligned {
            offset,
            len,
            align: limits.offset_align,
        });
    }
    Ok(offset)
}
#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
