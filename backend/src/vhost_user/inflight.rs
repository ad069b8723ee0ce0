//! Inflight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`, split rings; the vhost-user
//! spec's section "Inflight I/O tracking").
//!
//! vublk completes requests out of order, so after a crash the used index alone does not say
//! which chains the driver is still waiting for: QEMU rewinds the avail position to the used
//! index, and the next backend would run again a chain that had completed and never run an
//! older one still in flight. The fix is a region of shared memory that outlives the backend:
//! the backend makes it (`GET_INFLIGHT_FD`: a sealed memfd), QEMU keeps it and hands it to every
//! backend it connects to (`SET_INFLIGHT_FD`), and the queue threads record in it which heads
//! are in flight. A new worker (or a new daemon) reads it back when a ring starts, and
//! resubmits those heads, oldest first.
//!
//! ```text
//!  memfd: | queue 0 region | queue 1 region | ... |   each STRIDE(queue_size) bytes
//!  region: features u64 | version u16 | desc_num u16 | last_batch_head u16 | used_idx u16
//!          desc[desc_num]: inflight u8 | pad 5 | next u16 | counter u64
//! ```
//!
//! The order of the writes is what makes a crash at any point recoverable:
//! - a head taken from the avail ring: `counter`, then `inflight = 1`, before the next head
//!   is taken (so the heads in flight plus the used index are where the avail ring stands);
//! - a completion (a batch of one): `next = last_batch_head`, `last_batch_head = head`, the
//!   used ring entry and index, then `inflight = 0`, then `used_idx`. A crash between the used
//!   index and `used_idx` leaves `used_idx` behind the ring: recovery clears the last batch.
//!
//! The region is the frontend's memory as much as ours: everything read from it is checked
//! (version, desc_num against the ring's size, every index, the last batch) before use, and a
//! bad region refuses the ring's start, never crashes the worker.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// The region layout's version; 0 means a region no backend has initialised.
pub const VERSION: u16 = 1;
/// The region header: features, version, desc_num, last_batch_head, used_idx.
const HEADER: u64 = 16;
/// One `DescStateSplit`.
const DESC_STATE: u64 = 16;
/// Queue regions start on cache lines.
const ALIGN: u64 = 64;

/// The bytes of one queue's region for a ring of `queue_size`.
pub fn queue_region_size(queue_size: u16) -> u64 {
    (HEADER + DESC_STATE * u64::from(queue_size)).next_multiple_of(ALIGN)
}

/// Why an inflight region cannot be made, mapped or trusted.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    #[error("frontend asked for an inflight region of {num_queues} queue(s) of {queue_size} (we serve {max_queues} of up to {max_size})")]
    BadShape {
        num_queues: u16,
        queue_size: u16,
        max_queues: usize,
        max_size: u16,
    },
    #[error("cannot create the inflight memfd")]
    Create(#[source] io::Error),
    #[error("frontend's inflight region is {mmap_size} bytes at offset {mmap_offset}; {num_queues} queue(s) of {queue_size} need {needed}")]
    TooSmall {
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        needed: u64,
    },
    #[error("frontend's inflight offset {0} is not page aligned")]
    Unaligned(u64),
    #[error("frontend's inflight fd is not a sealed memfd of at least {needed} bytes (size {size}, seals {seals:#x}); it could shrink under us")]
    NotSealed { size: u64, seals: i32, needed: u64 },
    #[error("cannot inspect the frontend's inflight fd")]
    Inspect(#[source] io::Error),
    #[error("cannot map the frontend's inflight region")]
    Map(#[source] io::Error),
    #[error("inflight region of queue {0}: the frontend described fewer queues")]
    NoQueue(usize),
    #[error("inflight region of queue {queue}: the frontend sized it for rings of {region}, the ring has {ring}")]
    RingTooBig {
        queue: usize,
        region: u16,
        ring: u16,
    },
    #[error("inflight region: version {0}, not {VERSION}")]
    Version(u16),
    #[error("inflight region: desc_num {desc_num} is not the ring's size {size}")]
    DescNum { desc_num: u16, size: u16 },
    #[error("inflight region: descriptor {index} has inflight flag {flag}")]
    Flag { index: u16, flag: u8 },
    #[error("inflight region: last_batch_head {head} is not below {size}")]
    LastBatchHead { head: u16, size: u16 },
    #[error("inflight region: the last batch ({batch} completions, used index {region} in the region, {ring} in the ring) is longer than the ring")]
    BatchTooLong { batch: u16, region: u16, ring: u16 },
    #[error("inflight region: the last batch links to descriptor {next}, not below {size}")]
    BatchLink { next: u16, size: u16 },
}

/// GET_INFLIGHT_FD: a zeroed memfd for `num_queues` regions of rings of `queue_size`, sealed
/// so that it can neither shrink nor grow (a mapping of it never faults past its end). Returns
/// it with its size.
pub fn create(
    num_queues: u16,
    queue_size: u16,
    max_queues: usize,
    max_size: u16,
) -> Result<(File, u64), InflightError> {
    if num_queues == 0
        || usize::from(num_queues) > max_queues
        || queue_size == 0
        || queue_size > max_size
    {
        return Err(InflightError::BadShape {
            num_queues,
            queue_size,
            max_queues,
            max_size,
        });
    }
    let size = queue_region_size(queue_size) * u64::from(num_queues);
    let name = c"vublk-inflight";
    // SAFETY: memfd_create reads the NUL-terminated name; the fd it returns is owned by `file`.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(size).map_err(InflightError::Create)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl(F_ADD_SEALS) on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(InflightError::Create(io::Error::last_os_error()));
    }
    Ok((file, size))
}

/// The frontend's inflight memfd (SET_INFLIGHT_FD), mapped.
pub struct InflightMap {
    base: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is plain shared memory; every access goes through atomics.
unsafe impl Send for InflightMap {}
// SAFETY: as above.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// Maps `mmap_size` bytes at `mmap_offset` of `file`, after checking they hold
    /// `num_queues` regions of rings of `queue_size` and that the file cannot shrink.
    pub fn map(
        file: &File,
        mmap_size: u64,
        mmap_offset: u64,
        num_queues: u16,
        queue_size: u16,
        max_size: u16,
    ) -> Result<InflightMap, InflightError> {
        let needed = queue_region_size(queue_size) * u64::from(num_queues);
        if num_queues == 0 || queue_size == 0 || queue_size > max_size {
            return Err(InflightError::BadShape {
                num_queues,
                queue_size,
                max_queues: usize::from(num_queues),
                max_size,
            });
        }
        if mmap_size < needed || mmap_size > isize::MAX as u64 {
            return Err(InflightError::TooSmall {
                mmap_size,
                mmap_offset,
                num_queues,
                queue_size,
                needed,
            });
        }
        // SAFETY: sysconf takes no pointer.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        if mmap_offset % page != 0 {
            return Err(InflightError::Unaligned(mmap_offset));
        }
        let size = file.metadata().map_err(InflightError::Inspect)?.len();
        // SAFETY: fcntl(F_GET_SEALS) on the frontend's fd, which `file` owns; no memory passed.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        let end = mmap_offset.checked_add(mmap_size);
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 || end.is_none_or(|end| end > size) {
            return Err(InflightError::NotSealed {
                size,
                seals,
                needed: end.unwrap_or(u64::MAX),
            });
        }
        // SAFETY: a new shared mapping of the frontend's file, at an address the kernel picks;
        // the file is sealed against shrinking and at least offset + size long, so no access
        // within the mapping can fault. Drop unmaps it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mmap_size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                mmap_offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(InflightError::Map(io::Error::last_os_error()));
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| InflightError::Map(io::Error::other("mmap returned NULL")))?;
        Ok(InflightMap {
            base,
            len: mmap_size as usize,
            num_queues,
            queue_size,
        })
    }

    /// The region of queue `index`, for a ring of `ring_size` descriptors.
    pub fn queue(
        self: &Arc<Self>,
        index: usize,
        ring_size: u16,
    ) -> Result<QueueRegion, InflightError> {
        if index >= usize::from(self.num_queues) {
            return Err(InflightError::NoQueue(index));
        }
        if ring_size > self.queue_size {
            return Err(InflightError::RingTooBig {
                queue: index,
                region: self.queue_size,
                ring: ring_size,
            });
        }
        let offset = queue_region_size(self.queue_size) * index as u64;
        Ok(QueueRegion {
            map: self.clone(),
            offset: offset as usize,
            size: ring_size,
        })
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, of `len` bytes; every QueueRegion holds an Arc of
        // this map, so none is left to use it.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// One queue's region: header fields and descriptor states, each an atomic in shared memory.
pub struct QueueRegion {
    map: Arc<InflightMap>,
    offset: usize,
    /// The ring's size: every index used here is below it (and below the region's size).
    size: u16,
}

impl QueueRegion {
    /// The atomic of type `T` at `at` bytes into this queue's region.
    fn field<T>(&self, at: usize) -> &T {
        debug_assert!(self.offset + at + std::mem::size_of::<T>() <= self.map.len);
        // SAFETY: `at` is a field of the header or of a descriptor below `size`, which the map
        // checked fits in the mapping (queue_region_size of its queue size, >= `size`); the
        // offset is aligned for T (regions start on 64 bytes, fields on their size). The
        // mapping lives as long as the Arc this region holds. The frontend may write the same
        // memory at any time: it is only ever accessed through atomics.
        unsafe { &*self.map.base.as_ptr().add(self.offset + at).cast::<T>() }
    }

    fn version(&self) -> &AtomicU16 {
        self.field(8)
    }
    fn desc_num(&self) -> &AtomicU16 {
        self.field(10)
    }
    fn last_batch_head(&self) -> &AtomicU16 {
        self.field(12)
    }
    fn used_idx(&self) -> &AtomicU16 {
        self.field(14)
    }
    fn inflight(&self, head: u16) -> &AtomicU8 {
        self.field(HEADER as usize + DESC_STATE as usize * usize::from(head))
    }
    fn next(&self, head: u16) -> &AtomicU16 {
        self.field(HEADER as usize + DESC_STATE as usize * usize::from(head) + 6)
    }
    fn counter(&self, head: u16) -> &AtomicU64 {
        self.field(HEADER as usize + DESC_STATE as usize * usize::from(head) + 8)
    }

    /// Reads the region when its ring starts, repairs the last batch and returns what the
    /// queue must do: where the avail ring stands and which heads to run again, oldest first.
    /// `ring_used` is the used ring's index in guest memory; `base` what SET_VRING_BASE said,
    /// which a fresh region keeps (after a crash QEMU sends the used index, which is right only
    /// when nothing was in flight: the region knows better).
    pub fn recover(self, ring_used: u16, base: u16) -> Result<Recovered, InflightError> {
        let size = self.size;
        let version = self.version().load(Ordering::Acquire);
        if version == 0 {
            // A fresh region: describe the ring as it is now. used_idx comes from the ring,
            // not 0: a region made after a migration or a reset otherwise makes the first
            // recovery clear an entry that was never in the last batch.
            for head in 0..size {
                self.inflight(head).store(0, Ordering::Relaxed);
                self.next(head).store(0, Ordering::Relaxed);
                self.counter(head).store(0, Ordering::Relaxed);
            }
            self.desc_num().store(size, Ordering::Relaxed);
            self.last_batch_head().store(0, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Relaxed);
            self.version().store(VERSION, Ordering::Release);
            return Ok(Recovered {
                next_avail: base,
                resubmit: Vec::new(),
                tracker: Tracker {
                    region: self,
                    counter: 0,
                },
            });
        }
        if version != VERSION {
            return Err(InflightError::Version(version));
        }
        let desc_num = self.desc_num().load(Ordering::Acquire);
        if desc_num != size {
            return Err(InflightError::DescNum { desc_num, size });
        }
        // A snapshot, checked whole before anything is written back.
        let mut flags = Vec::with_capacity(usize::from(size));
        for index in 0..size {
            match self.inflight(index).load(Ordering::Acquire) {
                flag @ (0 | 1) => flags.push(flag == 1),
                flag => return Err(InflightError::Flag { index, flag }),
            }
        }
        if !flags.contains(&true) {
            // Nothing was left in flight: nothing to repair or run again, whatever the used
            // index says (a ring the driver re-created after a reset starts again at 0).
            self.last_batch_head().store(0, Ordering::Relaxed);
            self.used_idx().store(ring_used, Ordering::Release);
            let counter = 0;
            return Ok(Recovered {
                next_avail: base,
                resubmit: Vec::new(),
                tracker: Tracker {
                    region: self,
                    counter,
                },
            });
        }
        let region_used = self.used_idx().load(Ordering::Acquire);
        let mut last_batch = Vec::new();
        if region_used != ring_used {
            // The backend died between publishing a batch in the used ring and recording it
            // here: those heads are done, though their flags say otherwise.
            let batch = ring_used.wrapping_sub(region_used);
            if batch > size {
                return Err(InflightError::BatchTooLong {
                    batch,
                    region: region_used,
                    ring: ring_used,
                });
            }
            let mut head = self.last_batch_head().load(Ordering::Acquire);
            if head >= size {
                return Err(InflightError::LastBatchHead { head, size });
            }
            for i in 0..batch {
                last_batch.push(head);
                if i + 1 < batch {
                    head = self.next(head).load(Ordering::Acquire);
                    if head >= size {
                        return Err(InflightError::BatchLink { next: head, size });
                    }
                }
            }
        }
        for &head in &last_batch {
            flags[usize::from(head)] = false;
        }
        let mut resubmit: Vec<(u64, u16)> = (0..size)
            .filter(|&head| flags[usize::from(head)])
            .map(|head| (self.counter(head).load(Ordering::Acquire), head))
            .collect();
        let in_flight = resubmit.len() as u16;
        let next_avail = ring_used.wrapping_add(in_flight);
        // The repair, in the spec's order: flags of the last batch, then used_idx.
        for &head in &last_batch {
            self.inflight(head).store(0, Ordering::Release);
        }
        self.used_idx().store(ring_used, Ordering::Release);
        resubmit.sort_by_key(|&(counter, head)| (counter, head));
        let counter = resubmit.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Ok(Recovered {
            next_avail,
            resubmit: resubmit.into_iter().map(|(_, head)| head).collect(),
            tracker: Tracker {
                region: self,
                counter,
            },
        })
    }
}

/// What a ring starts from after [`QueueRegion::recover`].
pub struct Recovered {
    /// The next avail index to take: the used index plus the heads still in flight.
    pub next_avail: u16,
    /// Heads to run again, in the order they were first taken.
    pub resubmit: Vec<u16>,
    pub tracker: Tracker,
}

/// The queue thread's writer of its region.
pub struct Tracker {
    region: QueueRegion,
    /// The next head's counter (the order heads were taken in).
    counter: u64,
}

impl Tracker {
    /// `head` was taken from the avail ring; recorded before the next one is taken.
    pub fn taken(&mut self, head: u16) {
        if head >= self.region.size {
            return;
        }
        self.region
            .counter(head)
            .store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        self.region.inflight(head).store(1, Ordering::Release);
    }

    /// `head` is about to be written to the used ring: it becomes the last batch.
    pub fn completing(&mut self, head: u16) {
        if head >= self.region.size {
            return;
        }
        let last = self.region.last_batch_head().load(Ordering::Relaxed);
        self.region.next(head).store(last, Ordering::Relaxed);
        self.region.last_batch_head().store(head, Ordering::Release);
    }

    /// `head` is in the used ring, whose index is now `used_idx`.
    pub fn completed(&mut self, head: u16, used_idx: u16) {
        if head >= self.region.size {
            return;
        }
        self.region.inflight(head).store(0, Ordering::Release);
        self.region.used_idx().store(used_idx, Ordering::Release);
    }
}

/// The descriptors of the chain at `head` in the table at `table` of a ring of `size`, as the
/// avail ring's iterator would yield them (next links, one level of indirect table, at most
/// `size` descriptors, at most 4 GiB in all): how a resubmitted head is read again.
pub struct ChainWalk<'a> {
    mem: &'a GuestMemoryMmap,
    table: GuestAddress,
    len: u16,
    next: u16,
    ttl: u16,
    indirect: bool,
    bytes: u32,
}

impl<'a> ChainWalk<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, table: GuestAddress, size: u16, head: u16) -> Self {
        ChainWalk {
            mem,
            table,
            len: size,
            next: head,
            ttl: size,
            indirect: false,
            bytes: 0,
        }
    }
}

impl Iterator for ChainWalk<'_> {
    type Item = Descriptor;

    fn next(&mut self) -> Option<Descriptor> {
        if self.ttl == 0 || self.next >= self.len {
            return None;
        }
        let addr = self.table.checked_add(u64::from(self.next) * DESC_STATE)?;
        let desc: Descriptor = self.mem.read_obj(addr).ok()?;
        if desc.refers_to_indirect_table() {
            let entries = desc.len() / 16;
            if self.indirect
                || desc.len() % 16 != 0
                || entries == 0
                || entries > u32::from(u16::MAX)
            {
                self.ttl = 0;
                return None;
            }
            self.table = desc.addr();
            self.len = entries as u16;
            self.ttl = self.len;
            self.next = 0;
            self.indirect = true;
            return self.next();
        }
        self.bytes = self.bytes.checked_add(desc.len())?;
        if desc.has_next() {
            self.next = desc.next();
            self.ttl -= 1;
        } else {
            self.ttl = 0;
        }
        Some(desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(queue_size: u16) -> (File, Arc<InflightMap>) {
        let (file, size) = create(1, queue_size, 1, 1024).unwrap();
        let map = InflightMap::map(&file, size, 0, 1, queue_size, 1024).unwrap();
        (file, Arc::new(map))
    }

    #[test]
    fn regions_are_sized_for_their_descriptors_and_aligned() {
        assert_eq!(queue_region_size(1), 64);
        assert_eq!(queue_region_size(4), 128);
        assert_eq!(queue_region_size(256), 16 + 16 * 256 + 48);
        assert!(queue_region_size(1024) >= 16 + 16 * 1024);
    }

    #[test]
    fn a_fresh_region_takes_the_rings_used_index() {
        let (_f, map) = region(8);
        let r = map.queue(0, 8).unwrap().recover(500, 500).unwrap();
        assert_eq!(r.next_avail, 500);
        assert!(r.resubmit.is_empty());
        let again = map.queue(0, 8).unwrap();
        assert_eq!(again.used_idx().load(Ordering::Relaxed), 500);
        assert_eq!(again.version().load(Ordering::Relaxed), VERSION);
        assert_eq!(again.desc_num().load(Ordering::Relaxed), 8);
    }

    #[test]
    fn heads_in_flight_come_back_in_the_order_they_were_taken() {
        let (_f, map) = region(8);
        let mut t = map.queue(0, 8).unwrap().recover(0, 0).unwrap().tracker;
        for head in [5, 2, 7, 0] {
            t.taken(head);
        }
        // 2 and 0 complete, out of order.
        for (head, used) in [(2, 1), (0, 2)] {
            t.completing(head);
            t.completed(head, used);
        }
        let r = map.queue(0, 8).unwrap().recover(2, 2).unwrap();
        assert_eq!(r.resubmit, vec![5, 7]);
        assert_eq!(r.next_avail, 4);
    }

    #[test]
    fn a_batch_in_the_used_ring_but_not_recorded_is_cleared() {
        let (_f, map) = region(8);
        let mut t = map.queue(0, 8).unwrap().recover(0, 0).unwrap().tracker;
        t.taken(3);
        t.taken(4);
        // Head 4 reached the used ring (index 1) and the backend died before recording it.
        t.completing(4);
        let r = map.queue(0, 8).unwrap().recover(1, 1).unwrap();
        assert_eq!(r.resubmit, vec![3]);
        assert_eq!(r.next_avail, 2);
        assert_eq!(
            map.queue(0, 8).unwrap().used_idx().load(Ordering::Relaxed),
            1
        );
    }

    #[test]
    fn a_region_with_nothing_in_flight_follows_the_ring() {
        let (_f, map) = region(8);
        let mut t = map.queue(0, 8).unwrap().recover(0, 0).unwrap().tracker;
        for used in 1..=5 {
            t.taken(used % 8);
            t.completing(used % 8);
            t.completed(used % 8, used);
        }
        // The driver reset its ring: used index 0 again, base 0.
        let r = map.queue(0, 8).unwrap().recover(0, 0).unwrap();
        assert_eq!(r.next_avail, 0);
        assert!(r.resubmit.is_empty());
        assert_eq!(
            map.queue(0, 8).unwrap().used_idx().load(Ordering::Relaxed),
            0
        );
    }

    #[test]
    fn hostile_regions_are_refused() {
        let (_f, map) = region(8);
        let q = map.queue(0, 8).unwrap();
        q.version().store(VERSION, Ordering::Relaxed);
        q.desc_num().store(16, Ordering::Relaxed);
        assert!(matches!(
            map.queue(0, 8).unwrap().recover(0, 0),
            Err(InflightError::DescNum { .. })
        ));
        q.desc_num().store(8, Ordering::Relaxed);
        q.inflight(1).store(7, Ordering::Relaxed);
        assert!(matches!(
            map.queue(0, 8).unwrap().recover(0, 0),
            Err(InflightError::Flag { index: 1, flag: 7 })
        ));
        q.inflight(1).store(1, Ordering::Relaxed);
        q.last_batch_head().store(9, Ordering::Relaxed);
        assert!(matches!(
            map.queue(0, 8).unwrap().recover(1, 1),
            Err(InflightError::LastBatchHead { head: 9, .. })
        ));
        q.last_batch_head().store(1, Ordering::Relaxed);
        assert!(matches!(
            map.queue(0, 8).unwrap().recover(100, 100),
            Err(InflightError::BatchTooLong { .. })
        ));
        q.next(1).store(300, Ordering::Relaxed);
        assert!(matches!(
            map.queue(0, 8).unwrap().recover(2, 2),
            Err(InflightError::BatchLink { next: 300, .. })
        ));
        q.version().store(2, Ordering::Relaxed);
        assert!(matches!(
            map.queue(0, 8).unwrap().recover(0, 0),
            Err(InflightError::Version(2))
        ));
        assert!(matches!(map.queue(1, 8), Err(InflightError::NoQueue(1))));
        assert!(matches!(
            map.queue(0, 16),
            Err(InflightError::RingTooBig { .. })
        ));
    }

    #[test]
    fn an_unsealed_or_short_fd_is_refused() {
        let file = tempfile::tempfile().unwrap();
        file.set_len(4096).unwrap();
        assert!(matches!(
            InflightMap::map(&file, 4096, 0, 1, 8, 1024),
            Err(InflightError::NotSealed { .. })
        ));
        let (file, size) = create(1, 8, 1, 1024).unwrap();
        assert!(matches!(
            InflightMap::map(&file, size, 0, 2, 8, 1024),
            Err(InflightError::TooSmall { .. })
        ));
        assert!(matches!(
            InflightMap::map(&file, size * 64, 0, 1, 8, 1024),
            Err(InflightError::NotSealed { .. })
        ));
        assert!(matches!(
            InflightMap::map(&file, size, 100, 1, 8, 1024),
            Err(InflightError::Unaligned(100))
        ));
        assert!(create(2, 8, 1, 1024).is_err());
        assert!(create(1, 2048, 1, 1024).is_err());
    }
}
