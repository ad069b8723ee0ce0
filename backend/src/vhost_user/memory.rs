//! Guest memory tables as generations, and regions with explicit lifetimes.
//!
//! Every memory table the frontend installs (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) becomes a
//! new [`Generation`] with its own id. Queue threads load the current generation and parse each
//! chain against it; [`Generation::pin`] turns what the parser found into the request's
//! [`GuestBuffers`] (buffers.rs), which keep an `Arc` of the generation until the request's
//! completion is written back. A mapping is unmapped when the last generation holding its
//! region is dropped, so it can never go away under an in-flight I/O.
//!
//! On top of that, each region has a [`RegionPin`]: a count of the in-flight requests whose
//! buffers (or status byte) lie in it, and a `retiring` flag. It is what makes retiring
//! memory wait for exactly the requests that use it:
//!
//! - a request pins every region it touches (`RegionPin::try_pin`, through
//!   [`Generation::pin`]), which fails once the region is retiring (the kernel's `mmget_not_zero`): increment, then check the flag;
//! - the session retiring a region (REM_MEM_REG, a SET_MEM_TABLE that drops it, disconnect)
//!   sets the flag, then waits for the count to reach zero: set, then check the count.
//!
//! Either the request sees the flag and backs off, or the session sees the request and waits
//! for it (a Dekker handshake, model-checked with loom: see pin.rs).

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use thiserror::Error;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

pub use super::buffers::{GuestBuffers, RawBuffers};
pub use super::pin::RegionPin;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map guest memory region at guest address {gpa:#x} ({size:#x} bytes)")]
    Map {
        gpa: u64,
        size: u64,
        #[source]
        source: vhost::vhost_user::Error,
    },
    #[error("guest memory regions overlap or are invalid")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
    #[error("no guest memory region at guest address {gpa:#x} with size {size:#x}")]
    NoSuchRegion { gpa: u64, size: u64 },
    #[error("frontend address {0:#x} is not inside any guest memory region")]
    UnmappedVmmAddress(u64),
    #[error("the region at guest address {gpa:#x} has size 0 or wraps around")]
    BadRegion { gpa: u64 },
}

/// How one region appears to the frontend, to translate the vring addresses it sends (its own
/// virtual addresses) into guest physical addresses.
#[derive(Debug, Clone)]
struct RegionInfo {
    guest_phys_addr: u64,
    size: u64,
    user_addr: u64,
    mapping: Arc<GuestRegionMmap>,
    pin: Arc<RegionPin>,
}

impl RegionInfo {
    fn same_place(&self, other: &VhostUserMemoryRegion) -> bool {
        self.guest_phys_addr == other.guest_phys_addr
            && self.size == other.memory_size
            && self.user_addr == other.user_addr
    }
}

/// Regions taken out of service: the caller waits for their pins to drop before replying.
#[derive(Debug, Default)]
pub struct Retiring {
    pub pins: Vec<Arc<RegionPin>>,
}

/// Counters for `vublk status` and the logs.
#[derive(Debug, Default)]
pub struct MemoryStats {
    pub retire_waits: AtomicU64,
    pub longest_retire_wait_us: AtomicU64,
    pub cancelled: AtomicU64,
}

/// A snapshot of a device's memory lifetimes.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryStatus {
    pub generation: u64,
    /// Generations still alive (current, or pinned by requests), and their pins.
    pub live: Vec<(u64, usize)>,
    pub retire_waits: u64,
    pub longest_retire_wait_us: u64,
    pub cancelled: u64,
}

/// One memory table.
#[derive(Debug)]
pub struct Generation {
    id: u64,
    mem: GuestMemoryMmap,
    regions: Vec<RegionInfo>,
}

impl Generation {
    fn build(id: u64, mut regions: Vec<RegionInfo>) -> Result<Generation, MemoryError> {
        regions.sort_by_key(|r| r.guest_phys_addr);
        // Removing the last region leaves an empty table, which vm-memory cannot build.
        let mem = if regions.is_empty() {
            GuestMemoryMmap::new()
        } else {
            GuestMemoryMmap::from_arc_regions(regions.iter().map(|r| r.mapping.clone()).collect())
                .map_err(MemoryError::Layout)?
        };
        Ok(Generation { id, mem, regions })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// The index of the region whose mapping holds host addresses `[start, start + len)`.
    pub(super) fn region_index(&self, start: usize, len: usize) -> Option<usize> {
        self.regions.iter().position(|r| {
            let base = r.mapping.as_ptr() as usize;
            start
                .checked_sub(base)
                .and_then(|offset| Some((offset, offset.checked_add(len)?)))
                .is_some_and(|(offset, end)| offset < r.size as usize && end <= r.size as usize)
        })
    }

    /// The guest address of host address `host`, inside one of this generation's mappings.
    pub(super) fn host_to_guest(&self, host: usize) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let offset = host.checked_sub(r.mapping.as_ptr() as usize)? as u64;
            (offset < r.size).then(|| r.guest_phys_addr + offset)
        })
    }

    /// The end of the highest region: the guest addresses a dirty log must cover.
    pub fn end(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.guest_phys_addr + r.size)
            .max()
            .unwrap_or(0)
    }

    /// The pin of region `index` (from [`Generation::region_index`]).
    pub(super) fn region_pin(&self, index: usize) -> &Arc<RegionPin> {
        &self.regions[index].pin
    }

    /// Pins what a parsed chain points at, for one request: the regions holding the status
    /// byte at `status` and every iovec of `raw` (host addresses inside this generation's
    /// mappings), which must not be retiring. The result keeps this generation and the pins
    /// until it is released; [`GuestBuffers::is_complete`] says whether everything was
    /// pinned.
    pub fn pin(self: &Arc<Self>, raw: RawBuffers, status: Option<*const u8>) -> GuestBuffers {
        GuestBuffers::pin(self, raw, status)
    }

    /// The pins of the regions, in guest address order.
    #[cfg(test)]
    pub(crate) fn pins(&self) -> Vec<Arc<RegionPin>> {
        self.regions.iter().map(|r| r.pin.clone()).collect()
    }

    /// Translates a frontend virtual address (as in SET_VRING_ADDR) into a guest address.
    pub fn vmm_to_guest(&self, vmm_addr: u64) -> Result<GuestAddress, MemoryError> {
        self.regions
            .iter()
            .find(|r| vmm_addr >= r.user_addr && vmm_addr - r.user_addr < r.size)
            .map(|r| GuestAddress(r.guest_phys_addr + (vmm_addr - r.user_addr)))
            .ok_or(MemoryError::UnmappedVmmAddress(vmm_addr))
    }
}

fn map_region(region: &VhostUserMemoryRegion, file: File) -> Result<RegionInfo, MemoryError> {
    let gpa = region.guest_phys_addr;
    if region.memory_size == 0
        || gpa.checked_add(region.memory_size).is_none()
        || region.user_addr.checked_add(region.memory_size).is_none()
    {
        return Err(MemoryError::BadRegion { gpa });
    }
    let mmap = region
        .mmap_region(file)
        .map_err(|source| MemoryError::Map {
            gpa,
            size: region.memory_size,
            source,
        })?;
    let mapping =
        GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or(MemoryError::BadRegion { gpa })?;
    Ok(RegionInfo {
        guest_phys_addr: gpa,
        size: region.memory_size,
        user_addr: region.user_addr,
        mapping: Arc::new(mapping),
        pin: Arc::new(RegionPin::new(gpa, region.memory_size)),
    })
}

/// The current generation of one device's guest memory, shared by its session and its queue
/// threads. Cloning shares it.
#[derive(Clone)]
pub struct GuestMemoryHandle {
    current: Arc<ArcSwap<Generation>>,
    next_id: Arc<AtomicU64>,
    live: Arc<Mutex<Vec<Weak<Generation>>>>,
    stats: Arc<MemoryStats>,
}

impl Default for GuestMemoryHandle {
    fn default() -> Self {
        GuestMemoryHandle {
            current: Arc::new(ArcSwap::from_pointee(Generation {
                id: 0,
                mem: GuestMemoryMmap::new(),
                regions: Vec::new(),
            })),
            next_id: Arc::new(AtomicU64::new(1)),
            live: Arc::new(Mutex::new(Vec::new())),
            stats: Arc::new(MemoryStats::default()),
        }
    }
}

impl GuestMemoryHandle {
    /// The current generation: it stays mapped as long as the returned `Arc` lives.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    pub fn stats(&self) -> &MemoryStats {
        &self.stats
    }

    fn install(&self, regions: Vec<RegionInfo>) -> Result<Arc<Generation>, MemoryError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(Generation::build(id, regions)?);
        self.current.store(generation.clone());
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|g| g.strong_count() > 0);
        live.push(Arc::downgrade(&generation));
        Ok(generation)
    }

    /// SET_MEM_TABLE: a whole new table. Old regions not in it (same guest address, size and
    /// frontend address) retire.
    pub fn set_table(
        &self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<(Arc<Generation>, Retiring), MemoryError> {
        let mut mapped = regions
            .iter()
            .zip(files)
            .map(|(region, file)| map_region(region, file))
            .collect::<Result<Vec<_>, _>>()?;
        let old = self.current();
        // A region the new table keeps in place keeps its pin: requests still using the old
        // mapping of it count when it is removed later.
        for region in &mut mapped {
            if let Some(kept) = old.regions.iter().find(|r| {
                r.guest_phys_addr == region.guest_phys_addr
                    && r.size == region.size
                    && r.user_addr == region.user_addr
            }) {
                region.pin = kept.pin.clone();
            }
        }
        let retiring: Vec<_> = old
            .regions
            .iter()
            .filter(|r| !regions.iter().any(|n| r.same_place(n)))
            .map(|r| r.pin.clone())
            .collect();
        for pin in &retiring {
            pin.retire();
        }
        let generation = self.install(mapped)?;
        Ok((generation, Retiring { pins: retiring }))
    }

    /// ADD_MEM_REG: the current table plus one region.
    pub fn add_region(
        &self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> Result<Arc<Generation>, MemoryError> {
        let mut regions = self.current().regions.clone();
        regions.push(map_region(region, file)?);
        self.install(regions)
    }

    /// REM_MEM_REG: the current table less the region with this guest address and size, which
    /// retires.
    pub fn remove_region(
        &self,
        region: &VhostUserMemoryRegion,
    ) -> Result<(Arc<Generation>, Retiring), MemoryError> {
        let mut regions = self.current().regions.clone();
        let Some(at) = regions.iter().position(|r| {
            r.guest_phys_addr == region.guest_phys_addr && r.size == region.memory_size
        }) else {
            return Err(MemoryError::NoSuchRegion {
                gpa: region.guest_phys_addr,
                size: region.memory_size,
            });
        };
        let removed = regions.remove(at);
        removed.pin.retire();
        let generation = self.install(regions)?;
        Ok((
            generation,
            Retiring {
                pins: vec![removed.pin],
            },
        ))
    }

    /// Drops the table (disconnect): every region retires.
    pub fn clear(&self) -> Retiring {
        let old = self.current();
        let pins: Vec<_> = old.regions.iter().map(|r| r.pin.clone()).collect();
        for pin in &pins {
            pin.retire();
        }
        // An empty table cannot fail to build.
        let _ = self.install(Vec::new());
        Retiring { pins }
    }

    pub fn status(&self) -> MemoryStatus {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        MemoryStatus {
            generation: self.current().id,
            // Pins: every Arc but the handle's own (for the current one) is a request or a
            // queue thread's view of the ring.
            live: live
                .iter()
                .filter_map(|g| g.upgrade())
                .map(|g| (g.id, Arc::strong_count(&g) - 1))
                .collect(),
            retire_waits: self.stats.retire_waits.load(Ordering::Relaxed),
            longest_retire_wait_us: self.stats.longest_retire_wait_us.load(Ordering::Relaxed),
            cancelled: self.stats.cancelled.load(Ordering::Relaxed),
        }
    }
}

/// Guest memory for unit tests: regions `(guest address, size)` backed by files in /dev/shm,
/// installed with SET_MEM_TABLE's path. The frontend addresses are made up (0x7f00_0000_0000
/// plus the guest address).
#[cfg(test)]
pub(crate) fn test_memory(regions: &[(u64, u64)]) -> GuestMemoryHandle {
    let handle = GuestMemoryHandle::default();
    let (table, files): (Vec<_>, Vec<_>) = regions
        .iter()
        .map(|&(gpa, size)| {
            let file = tempfile::tempfile_in("/dev/shm").expect("a file in /dev/shm");
            file.set_len(size).expect("size the region's file");
            let region = VhostUserMemoryRegion::new(gpa, size, 0x7f00_0000_0000 + gpa, 0);
            (region, file)
        })
        .unzip();
    handle.set_table(&table, files).expect("install the table");
    handle
}
