//! virtio-blk requests on top of a [`Session`]: headers, the usual chain shapes, config parsing.
//!
//! A request is `header (16 bytes, readable) | data... | status (1 byte, writable)` (virtio 1.x,
//! 5.2.6). The helpers here build that shape with every buffer in its own descriptor; tests that
//! want other shapes use [`BlkQueue::submit_raw`] with their own [`Seg`]s and the buffers
//! allocated by [`BlkQueue::alloc`]. The status byte is pre-set to [`STATUS_UNTOUCHED`] so a
//! test can tell "device wrote OK" from "device never wrote".

use std::time::Duration;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};

use super::session::{Session, SessionError};
use super::virtqueue::{Seg, UsedElem};

pub const T_IN: u32 = VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = VIRTIO_BLK_T_WRITE_ZEROES;

pub const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// What the status byte holds before the device writes it.
pub const STATUS_UNTOUCHED: u8 = 0xa5;

/// Size of `struct virtio_blk_config` with every field Linux knows today (through the zoned
/// block device fields); what a config read of "the whole thing" asks for.
pub const BLK_CONFIG_LEN_FULL: u32 = 96;
/// Bytes in a GET_ID reply.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// virtio-blk sectors are always 512 bytes, whatever blk_size says.
pub const SECTOR: u64 = 512;
/// Default per-request timeout.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// `struct virtio_blk_outhdr`.
pub fn header(req_type: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One `struct virtio_blk_discard_write_zeroes` segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

impl Range {
    pub const fn new(sector: u64, num_sectors: u32) -> Self {
        Self {
            sector,
            num_sectors,
            flags: 0,
        }
    }

    /// WRITE_ZEROES with the UNMAP flag.
    pub const fn unmap(mut self) -> Self {
        self.flags |= VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        self
    }

    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.sector.to_le_bytes());
        b[8..12].copy_from_slice(&self.num_sectors.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
}

/// `struct virtio_blk_config`, as far as GET_CONFIG returned it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlkConfig {
    pub capacity: u64,
    pub size_max: u32,
    pub seg_max: u32,
    pub cylinders: u16,
    pub heads: u8,
    pub sectors: u8,
    pub blk_size: u32,
    pub physical_block_exp: u8,
    pub alignment_offset: u8,
    pub min_io_size: u16,
    pub opt_io_size: u32,
    pub writeback: u8,
    pub num_queues: u16,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub discard_sector_alignment: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: u8,
}

impl BlkConfig {
    /// Parses the fields present in `b` (starting at config offset 0); missing ones stay 0.
    pub fn parse(b: &[u8]) -> Self {
        let u8_at = |o: usize| b.get(o).copied().unwrap_or(0);
        let u16_at = |o: usize| u16::from_le_bytes([u8_at(o), u8_at(o + 1)]);
        let u32_at =
            |o: usize| u32::from_le_bytes([u8_at(o), u8_at(o + 1), u8_at(o + 2), u8_at(o + 3)]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Self {
            capacity: u64_at(0),
            size_max: u32_at(8),
            seg_max: u32_at(12),
            cylinders: u16_at(16),
            heads: u8_at(18),
            sectors: u8_at(19),
            blk_size: u32_at(20),
            physical_block_exp: u8_at(24),
            alignment_offset: u8_at(25),
            min_io_size: u16_at(26),
            opt_io_size: u32_at(28),
            writeback: u8_at(32),
            num_queues: u16_at(34),
            max_discard_sectors: u32_at(36),
            max_discard_seg: u32_at(40),
            discard_sector_alignment: u32_at(44),
            max_write_zeroes_sectors: u32_at(48),
            max_write_zeroes_seg: u32_at(52),
            write_zeroes_may_unmap: u8_at(56),
        }
    }
}

/// The outcome of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The used ring element.
    pub used: UsedElem,
    /// The status byte as found after completion ([`STATUS_UNTOUCHED`] if never written;
    /// `None` if the chain had no status buffer).
    pub status: Option<u8>,
    /// Device-writable data buffers, concatenated, as found after completion.
    pub data: Vec<u8>,
}

impl Completion {
    /// Status, failing loudly if the chain had none.
    pub fn status(&self) -> u8 {
        self.status.expect("request had no status buffer")
    }
}

/// Guest buffers of a request built with [`BlkQueue::alloc`], to read back after completion.
#[derive(Debug, Clone, Default)]
pub struct Readback {
    /// Writable data buffers (address, length), read back into `Completion::data`.
    pub data: Vec<(u64, u32)>,
    /// Status byte address, if any.
    pub status: Option<u64>,
}

/// virtio-blk operations on one queue of a session.
pub struct BlkQueue<'s> {
    session: &'s mut Session,
    queue: usize,
    timeout: Duration,
}

impl Session {
    /// virtio-blk helpers for queue `queue`.
    pub fn blk(&mut self, queue: usize) -> BlkQueue<'_> {
        BlkQueue {
            session: self,
            queue,
            timeout: TIMEOUT,
        }
    }
}

impl<'s> BlkQueue<'s> {
    /// Overrides the per-request timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The session underneath.
    pub fn session(&mut self) -> &mut Session {
        self.session
    }

    /// Allocates `len` bytes of guest memory (8-byte aligned) filled with `fill`.
    pub fn alloc(&mut self, len: usize, fill: u8) -> Result<u64, SessionError> {
        let (mem, arena) = self.session.mem_and_arena();
        let at = arena.alloc(len.max(1) as u64, 8)?;
        mem.fill(at, len, fill)?;
        Ok(at)
    }

    /// Allocates guest memory holding `bytes`.
    pub fn alloc_bytes(&mut self, bytes: &[u8]) -> Result<u64, SessionError> {
        let at = self.alloc(bytes.len(), 0)?;
        self.session.mem().write(at, bytes)?;
        Ok(at)
    }

    /// Allocates a status byte preset to [`STATUS_UNTOUCHED`].
    pub fn alloc_status(&mut self) -> Result<u64, SessionError> {
        self.alloc(1, STATUS_UNTOUCHED)
    }

    /// Submits `segs` as one chain, waits for its head, reads back `rb`.
    pub fn submit_raw(&mut self, segs: &[Seg], rb: &Readback) -> Result<Completion, SessionError> {
        let head = self.session.submit(self.queue, segs)?;
        self.finish(head, rb)
    }

    /// Waits for `head` and reads back `rb`.
    pub fn finish(&mut self, head: u16, rb: &Readback) -> Result<Completion, SessionError> {
        let used = self.session.wait_head(self.queue, head, self.timeout)?;
        let mem = self.session.mem();
        let mut data = Vec::new();
        for &(addr, len) in &rb.data {
            data.extend(mem.read(addr, len as usize)?);
        }
        let status = match rb.status {
            Some(a) => Some(mem.read(a, 1)?[0]),
            None => None,
        };
        Ok(Completion { used, status, data })
    }

    /// Runs `f` with buffers allocated from the arena, then frees them.
    fn scoped<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, SessionError>,
    ) -> Result<T, SessionError> {
        let mark = self.session.arena().mark();
        let r = f(self);
        self.session.arena().release(mark);
        r
    }

    /// A request of the usual shape: header, readable `out` data (if any), `in_len` writable
    /// bytes (if nonzero), status.
    pub fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        out: &[u8],
        in_len: u32,
    ) -> Result<Completion, SessionError> {
        self.scoped(|b| {
            let hdr = b.alloc_bytes(&header(req_type, sector))?;
            let mut segs = vec![Seg::readable(hdr, 16)];
            let mut rb = Readback::default();
            if !out.is_empty() {
                let at = b.alloc_bytes(out)?;
                segs.push(Seg::readable(at, out.len() as u32));
            }
            if in_len > 0 {
                let at = b.alloc(in_len as usize, 0xee)?;
                segs.push(Seg::writable(at, in_len));
                rb.data.push((at, in_len));
            }
            let status = b.alloc_status()?;
            segs.push(Seg::writable(status, 1));
            rb.status = Some(status);
            b.submit_raw(&segs, &rb)
        })
    }

    /// VIRTIO_BLK_T_IN of `len` bytes at `sector`.
    pub fn read(&mut self, sector: u64, len: u32) -> Result<Completion, SessionError> {
        self.request(T_IN, sector, &[], len)
    }

    /// VIRTIO_BLK_T_OUT of `data` at `sector`.
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<Completion, SessionError> {
        self.request(T_OUT, sector, data, 0)
    }

    /// VIRTIO_BLK_T_FLUSH.
    pub fn flush(&mut self) -> Result<Completion, SessionError> {
        self.request(T_FLUSH, 0, &[], 0)
    }

    /// VIRTIO_BLK_T_GET_ID (20 bytes).
    pub fn get_id(&mut self) -> Result<Completion, SessionError> {
        self.request(T_GET_ID, 0, &[], ID_BYTES as u32)
    }

    /// VIRTIO_BLK_T_DISCARD of `ranges`.
    pub fn discard(&mut self, ranges: &[Range]) -> Result<Completion, SessionError> {
        let segs: Vec<u8> = ranges.iter().flat_map(|r| r.to_bytes()).collect();
        self.request(T_DISCARD, 0, &segs, 0)
    }

    /// VIRTIO_BLK_T_WRITE_ZEROES of `ranges`.
    pub fn write_zeroes(&mut self, ranges: &[Range]) -> Result<Completion, SessionError> {
        let segs: Vec<u8> = ranges.iter().flat_map(|r| r.to_bytes()).collect();
        self.request(T_WRITE_ZEROES, 0, &segs, 0)
    }
}
