//! Guest memory tables as generations.
//!
//! Every memory table the frontend installs (SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG) becomes a
//! new [`Generation`] with its own id. Queue threads load the current generation and keep an
//! `Arc` of it in every request they parse until its completion is written back: that `Arc` is
//! the pin. A mapping is unmapped when the last generation holding its region is dropped, so it
//! can never go away under an in-flight I/O.

use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use thiserror::Error;
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

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
    let mmap = region.mmap_region(file).map_err(|source| MemoryError::Map {
        gpa,
        size: region.memory_size,
        source,
    })?;
    let mapping = GuestRegionMmap::new(mmap, GuestAddress(gpa)).ok_or(MemoryError::BadRegion { gpa })?;
    Ok(RegionInfo {
        guest_phys_addr: gpa,
        size: region.memory_size,
        user_addr: region.user_addr,
        mapping: Arc::new(mapping),
    })
}

/// The current generation of one device's guest memory, shared by its session and its queue
/// threads. Cloning shares it.
#[derive(Clone)]
pub struct GuestMemoryHandle {
    current: Arc<ArcSwap<Generation>>,
    next_id: Arc<AtomicU64>,
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
        }
    }
}

impl GuestMemoryHandle {
    /// Pins the current generation: it stays mapped as long as the returned `Arc` lives.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    fn install(&self, regions: Vec<RegionInfo>) -> Result<Arc<Generation>, MemoryError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let generation = Arc::new(Generation::build(id, regions)?);
        self.current.store(generation.clone());
        Ok(generation)
    }

    /// SET_MEM_TABLE: a whole new table.
    pub fn set_table(
        &self,
        regions: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> Result<Arc<Generation>, MemoryError> {
        let mapped = regions
            .iter()
            .zip(files)
            .map(|(region, file)| map_region(region, file))
            .collect::<Result<Vec<_>, _>>()?;
        self.install(mapped)
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

    /// REM_MEM_REG: the current table less the region with this guest address and size.
    pub fn remove_region(
        &self,
        region: &VhostUserMemoryRegion,
    ) -> Result<Arc<Generation>, MemoryError> {
        let mut regions = self.current().regions.clone();
        let before = regions.len();
        regions.retain(|r| {
            !(r.guest_phys_addr == region.guest_phys_addr && r.size == region.memory_size)
        });
        if regions.len() == before {
            return Err(MemoryError::NoSuchRegion {
                gpa: region.guest_phys_addr,
                size: region.memory_size,
            });
        }
        self.install(regions)
    }

    /// Drops the table (disconnect): nothing new can pin it; in-flight requests keep their pins.
    pub fn clear(&self) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.current.store(Arc::new(Generation {
            id,
            mem: GuestMemoryMmap::new(),
            regions: Vec::new(),
        }));
    }
}
