//! The driver side of a split virtqueue, living in [`GuestMemory`].
//!
//! It lays out the descriptor table, the available ring and the used ring, hands out descriptor
//! slots, publishes chains and collects used elements. Besides well-formed chains it can write
//! anything a buggy or hostile guest could: any flags, any `next`, loops, indirect tables with
//! nested tables, addresses outside guest memory, avail index jumps and out-of-range heads.
//!
//! Layout (virtio 1.x, 2.7 "Split Virtqueues"):
//! ```text
//! descriptor table  16 * size          { addr: le64, len: le32, flags: le16, next: le16 }
//! available ring    6 + 2 * size       { flags, idx, ring[size], used_event }   (le16 each)
//! used ring         6 + 8 * size       { flags, idx, ring[size] { id: le32, len: le32 }, avail_event }
//! ```

use std::collections::HashMap;
use std::sync::atomic::{fence, Ordering};

use vhost::VringConfigData;
use virtio_bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;

use super::memory::{Arena, GuestMemory, MemoryError};

/// Descriptor continues via `next`.
pub const DESC_F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor is device-writable.
pub const DESC_F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor points at an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;

/// Virtqueue driver errors.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("queue size {0} is not a power of two in 1..=32768")]
    BadSize(u16),
    #[error("the descriptor table has {free} free slots, the chain needs {needed}")]
    Full { free: usize, needed: usize },
    #[error("a chain needs at least one descriptor")]
    EmptyChain,
}

/// One buffer of a chain: a guest address range, device-readable or device-writable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub write: bool,
}

impl Seg {
    /// A buffer the device reads.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: false,
        }
    }

    /// A buffer the device writes.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            write: true,
        }
    }

    fn flags(&self) -> u16 {
        if self.write {
            DESC_F_WRITE
        } else {
            0
        }
    }
}

/// An element the device put in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UsedElem {
    /// Head index of the completed chain.
    pub id: u32,
    /// Bytes the device says it wrote into the chain.
    pub len: u32,
}

/// Driver state of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    /// Descriptor slots not part of any published chain.
    free: Vec<u16>,
    /// Slots owned by each published head, returned to `free` when the head is used.
    chains: HashMap<u16, Vec<u16>>,
    /// The driver's avail index: the next ring entry to fill.
    avail_idx: u16,
    /// The next used ring entry to read.
    last_used: u16,
}

impl SplitQueue {
    /// Allocates and zeroes the three areas of a queue with `size` entries from `arena`.
    pub fn new(mem: &GuestMemory, arena: &mut Arena, size: u16) -> Result<Self, QueueError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(QueueError::BadSize(size));
        }
        let n = u64::from(size);
        let desc_table = arena.alloc(DESC_SIZE * n, 4096)?;
        let avail_ring = arena.alloc(6 + 2 * n, 4096)?;
        let used_ring = arena.alloc(6 + USED_ELEM_SIZE * n, 4096)?;
        mem.fill(desc_table, (DESC_SIZE * n) as usize, 0)?;
        mem.fill(avail_ring, (6 + 2 * n) as usize, 0)?;
        mem.fill(used_ring, (6 + USED_ELEM_SIZE * n) as usize, 0)?;
        Ok(Self {
            size,
            desc_table,
            avail_ring,
            used_ring,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        })
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest address of the descriptor table.
    pub fn desc_table(&self) -> u64 {
        self.desc_table
    }

    /// Guest address of the available ring.
    pub fn avail_ring(&self) -> u64 {
        self.avail_ring
    }

    /// Guest address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// The driver's next avail index (what SET_VRING_BASE should carry on a fresh queue).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The next used index the driver expects to read.
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Heads published and not yet seen in the used ring.
    pub fn in_flight(&self) -> usize {
        self.chains.len()
    }

    /// The SET_VRING_ADDR payload: ring addresses as frontend virtual addresses.
    pub fn config_data(&self, mem: &GuestMemory) -> Result<VringConfigData, QueueError> {
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: mem.uva(self.desc_table)?,
            used_ring_addr: mem.uva(self.used_ring)?,
            avail_ring_addr: mem.uva(self.avail_ring)?,
            log_addr: None,
        })
    }

    /// Takes `n` free descriptor slots (not yet tied to a head).
    pub fn alloc_slots(&mut self, n: usize) -> Result<Vec<u16>, QueueError> {
        if n > self.free.len() {
            return Err(QueueError::Full {
                free: self.free.len(),
                needed: n,
            });
        }
        let at = self.free.len() - n;
        let mut slots = self.free.split_off(at);
        slots.reverse();
        Ok(slots)
    }

    /// Ties `slots` to `head`, so they are freed when the device returns `head`.
    pub fn track(&mut self, head: u16, slots: Vec<u16>) {
        if let Some(old) = self.chains.insert(head, slots) {
            // The same head published twice: keep the earlier slots reachable.
            self.chains.entry(head).or_default().extend(old);
        }
    }

    /// Writes descriptor `index` of the table verbatim. `index` may be out of range on purpose:
    /// the write then lands in guest memory after the table, which is what a hostile guest does.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        index: u16,
        desc: Descriptor,
    ) -> Result<(), QueueError> {
        mem.write_obj(self.desc_table + u64::from(index) * DESC_SIZE, desc)?;
        Ok(())
    }

    /// Writes `segs` as a chain linked by `NEXT` and returns its head (not yet published).
    pub fn add_chain(&mut self, mem: &GuestMemory, segs: &[Seg]) -> Result<u16, QueueError> {
        let descs: Vec<(u64, u32, u16)> = segs.iter().map(|s| (s.addr, s.len, s.flags())).collect();
        self.add_linked(mem, &descs)
    }

    /// Writes descriptors `(addr, len, flags)` into fresh slots and links each one that carries
    /// `DESC_F_NEXT` to the following slot; flags are otherwise written as given (so a chain may
    /// mix in `INDIRECT`, stray bits, or end early). Returns the head (not yet published).
    pub fn add_linked(
        &mut self,
        mem: &GuestMemory,
        descs: &[(u64, u32, u16)],
    ) -> Result<u16, QueueError> {
        if descs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        let slots = self.alloc_slots(descs.len())?;
        let last = descs.len() - 1;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let next = if i < last { slots[i + 1] } else { 0 };
            let flags = if i < last { flags | DESC_F_NEXT } else { flags };
            if let Err(e) = self.write_desc(mem, slots[i], Descriptor::new(addr, len, flags, next))
            {
                self.free.extend(slots);
                return Err(e);
            }
        }
        let head = slots[0];
        self.track(head, slots);
        Ok(head)
    }

    /// Writes `segs` as an indirect table at guest address `table` (16 bytes per entry, linked
    /// by `NEXT` inside the table) and one direct descriptor pointing at it. Returns the head.
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemory,
        table: u64,
        segs: &[Seg],
    ) -> Result<u16, QueueError> {
        if segs.is_empty() {
            return Err(QueueError::EmptyChain);
        }
        let entries: Vec<Descriptor> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let more = i + 1 < segs.len();
                let flags = s.flags() | if more { DESC_F_NEXT } else { 0 };
                Descriptor::new(s.addr, s.len, flags, if more { i as u16 + 1 } else { 0 })
            })
            .collect();
        write_table(mem, table, &entries)?;
        let table_len = (entries.len() as u64 * DESC_SIZE) as u32;
        self.add_linked(mem, &[(table, table_len, DESC_F_INDIRECT)])
    }

    /// Makes `head` visible to the device: fills the next avail ring entry, then (release)
    /// bumps `avail.idx`. Also asks for an interrupt on the next used entry (`used_event`).
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) -> Result<(), QueueError> {
        self.push_avail_entry(mem, head)?;
        self.set_used_event(mem, self.last_used)?;
        self.set_avail_idx(mem, self.avail_idx.wrapping_add(1))
    }

    /// Publishes several heads with a single index update (one kick's worth of work).
    pub fn publish_batch(&mut self, mem: &GuestMemory, heads: &[u16]) -> Result<(), QueueError> {
        let start = self.avail_idx;
        for (i, &head) in heads.iter().enumerate() {
            let slot = u64::from(start.wrapping_add(i as u16) % self.size);
            mem.store(self.avail_ring + 4 + 2 * slot, head, Ordering::Relaxed)?;
        }
        self.set_used_event(mem, self.last_used)?;
        self.set_avail_idx(mem, start.wrapping_add(heads.len() as u16))
    }

    /// Writes `head` into the avail ring entry at the driver's current index, without making it
    /// visible. Any value is allowed, including heads >= size.
    pub fn push_avail_entry(&mut self, mem: &GuestMemory, head: u16) -> Result<(), QueueError> {
        let slot = u64::from(self.avail_idx % self.size);
        mem.store(self.avail_ring + 4 + 2 * slot, head, Ordering::Relaxed)?;
        Ok(())
    }

    /// Stores `avail.idx` (release), e.g. to jump it further than the ring holds.
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) -> Result<(), QueueError> {
        fence(Ordering::Release);
        mem.store(self.avail_ring + 2, idx, Ordering::Release)?;
        self.avail_idx = idx;
        Ok(())
    }

    /// Sets or clears `VRING_AVAIL_F_NO_INTERRUPT`.
    pub fn set_no_interrupt(&self, mem: &GuestMemory, on: bool) -> Result<(), QueueError> {
        let flags: u16 = if on {
            VRING_AVAIL_F_NO_INTERRUPT as u16
        } else {
            0
        };
        mem.store(self.avail_ring, flags, Ordering::Release)?;
        Ok(())
    }

    /// Writes `used_event` (`avail.ring[size]`): with EVENT_IDX the device signals once it moves
    /// the used index past this value.
    pub fn set_used_event(&self, mem: &GuestMemory, idx: u16) -> Result<(), QueueError> {
        let at = self.avail_ring + 4 + 2 * u64::from(self.size);
        mem.store(at, idx, Ordering::Release)?;
        Ok(())
    }

    /// Reads `avail_event` (`used.ring[size]`), where an EVENT_IDX device says when to kick.
    pub fn avail_event(&self, mem: &GuestMemory) -> Result<u16, QueueError> {
        let at = self.used_ring + 4 + USED_ELEM_SIZE * u64::from(self.size);
        Ok(mem.load(at, Ordering::Acquire)?)
    }

    /// `used.flags` (bit 0: the device asks not to be kicked).
    pub fn used_flags(&self, mem: &GuestMemory) -> Result<u16, QueueError> {
        Ok(mem.load(self.used_ring, Ordering::Acquire)?)
    }

    /// `used.idx` as the device last published it (acquire).
    pub fn used_idx(&self, mem: &GuestMemory) -> Result<u16, QueueError> {
        Ok(mem.load(self.used_ring + 2, Ordering::Acquire)?)
    }

    /// Takes the next used element, if the device has published one, and frees its slots.
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Result<Option<UsedElem>, QueueError> {
        if self.used_idx(mem)? == self.last_used {
            return Ok(None);
        }
        fence(Ordering::Acquire);
        let at = self.used_ring + 4 + USED_ELEM_SIZE * u64::from(self.last_used % self.size);
        let id: u32 = mem.load(at, Ordering::Acquire)?;
        let len: u32 = mem.load(at + 4, Ordering::Acquire)?;
        self.last_used = self.last_used.wrapping_add(1);
        if let Ok(head) = u16::try_from(id) {
            if let Some(slots) = self.chains.remove(&head) {
                self.free.extend(slots);
            }
        }
        Ok(Some(UsedElem { id, len }))
    }
}

/// Writes an indirect descriptor table verbatim (for nested or malformed tables).
pub fn write_table(
    mem: &GuestMemory,
    table: u64,
    entries: &[Descriptor],
) -> Result<(), QueueError> {
    for (i, d) in entries.iter().enumerate() {
        mem.write_obj(table + i as u64 * DESC_SIZE, *d)?;
    }
    Ok(())
}

/// A raw descriptor, re-exported so callers can build tables without naming virtio-queue.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor::new(addr, len, flags, next)
}
